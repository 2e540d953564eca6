"""`tokenmill export --format hf`: folders that transformers loads offline with equal logits and greedy text,
tokenizers that encode like tokenmill's, sharded / bf16 / DCP-sharded sources, and refusals that change nothing."""

from __future__ import annotations

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from interop_cases import ARCHES, HF_CLASS  # noqa: E402

from tokenmill.api import load_tokenizer  # noqa: E402
from tokenmill.generation.engine import Generator, SamplingParams  # noqa: E402
from tokenmill.interop import export as export_module  # noqa: E402
from tokenmill.interop.export import export_hf, round_weights  # noqa: E402

TOL = 1e-5
TEXTS = ["Déjà vu <|eos|> naïve 日本語 🙂", "<|bos|>start", "def f(x):\n\treturn x  # <|pad|>", "", " leading space"]


def probe(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", list(ARCHES))
def test_export_loads_with_equal_logits_and_greedy_text(make_run, tmp_path, arch):
    run, model, _ = make_run(arch)
    result = export_hf(run, tmp_path / "hf")
    assert result.hf_class == HF_CLASS[arch] and result.max_logit_diff <= TOL
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == HF_CLASS[arch]
    with torch.no_grad():
        assert (hf(probe()).logits - model(probe())).abs().max().item() <= TOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(run)
    ids = hf_tok("def add(x, y):", return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.encode("def add(x, y):")
    generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    (greedy,) = Generator(model, ours).generate([ids[0].tolist()], SamplingParams(max_new_tokens=12, temperature=0))
    assert generated[0, ids.shape[1] :].tolist() == greedy.token_ids  # both end at EOS or after 12 tokens

    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (0, 0, 2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        assert ("lm_head.weight" in set(handle.keys())) == (not model.cfg.tie_embeddings)  # a tied head is stored once


def test_sharded_bf16_export(make_run, tmp_path):
    run, model, _ = make_run("llama-gqa-untied")
    result = export_hf(run, tmp_path / "hf", dtype="bf16", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "hf" / name).is_file() for name in shards)
    assert result.max_logit_diff <= TOL
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    reference = round_weights(model, torch.bfloat16)  # what the bf16 weights compute in fp32
    with torch.no_grad():
        assert (hf.float()(probe()).logits - reference(probe())).abs().max().item() <= TOL


def test_export_from_sharded_checkpoint(make_run, tmp_path):
    run, model, _ = make_run("qwen3", sharded=True)
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert (checkpoint / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (hf(probe()).logits - model(probe())).abs().max().item() <= TOL


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_tokenizer_round_trip(make_run, tmp_path, tokenizer):
    run, _, _ = make_run("gpt2", tokenizer="byte" if tokenizer == "byte" else None)
    export_hf(run, tmp_path / "hf", verify=False)
    ours, hf_tok = load_tokenizer(run), transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]  # default call: no special tokens are added
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == text == ours.decode(ids)
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == ours.eos_id  # documents were EOS-joined
    assert hf_tok.pad_token_id == ours.pad_id
    assert hf_tok.decode([ours.eos_id]) == "<|eos|>"
    assert "<|eos|>" in (tmp_path / "hf" / "README.md").read_text()


def test_cli_prints_the_verified_difference(make_run, tmp_path, cli):
    run, _, _ = make_run("gpt2")
    code, out, _ = cli("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0
    assert "GPT2LMHeadModel" in out and "max |logit difference|" in out
    assert (tmp_path / "hf" / "config.json").is_file()


def test_force_replaces_only_a_verified_folder(make_run, tmp_path, cli, assert_refused, monkeypatch):
    run, _, _ = make_run("llama-gqa-tied")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused("export", run, "--out", out, match="already exists.*--force")
    monkeypatch.setattr(export_module, "VERIFY_TOLERANCE", -1.0)  # every comparison now fails
    assert_refused("export", run, "--out", out, "--force", match="verification failed")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    code, _, _ = cli("export", run, "--out", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_bad_input_changes_nothing(make_run, tmp_path, assert_refused, monkeypatch):
    assert_refused("export", tmp_path / "missing", "--out", tmp_path / "hf", match="does not exist")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert_refused("export", tmp_path / "empty", "--out", tmp_path / "hf", match="no valid checkpoint")
    post, _, _ = make_run("llama-gqa-tied", "model.norm_position=post", name="post")
    assert_refused("export", post, "--out", tmp_path / "hf", match="norm_position must be pre")
    none, _, _ = make_run("llama-gqa-tied", "model.position=none", name="nopos")
    assert_refused("export", none, "--out", tmp_path / "hf", match="position='none'")
    plain, _, _ = make_run("gpt2", name="plain")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    assert_refused("export", plain, "--out", tmp_path / "hf", match=r"pip install 'tokenmill\[hf\]'")
    assert not (tmp_path / "hf").exists()

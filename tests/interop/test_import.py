"""`tokenmill import` and `train.init_from`: Hugging Face folders become normal run folders (with their tokenizer),
import then export is weight-identical, and a new run starts from imported weights with a fresh optimizer."""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from interop_cases import TEXTS  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tokenmill  # noqa: E402
from tokenmill.config import load_config  # noqa: E402
from tokenmill.errors import UserError  # noqa: E402
from tokenmill.interop.export import export_hf  # noqa: E402
from tokenmill.interop.hf_import import import_hf  # noqa: E402
from tokenmill.train.run_dir import prepare_run_dir  # noqa: E402

TOL = 1e-5
PROBE = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))


def hf_native(tmp_path, bpe_file, kind: str, tied: bool):
    """A folder written by transformers itself (random weights) plus a tokenizer.json, as on the Hub."""
    common = {"vocab_size": 320, "tie_word_embeddings": tied}
    rope = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "head_dim": 16,
        **common,
    }
    config = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common),
        "llama": lambda: transformers.LlamaConfig(**rope),
        "qwen3": lambda: transformers.Qwen3Config(**rope),
    }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / f"hf-{kind}"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    return folder, model


@pytest.mark.parametrize("kind, tied", [("gpt2", True), ("llama", False), ("qwen3", True)])
def test_import_hf_folder_as_run(tmp_path, bpe_file, kind, tied):
    folder, hf = hf_native(tmp_path, bpe_file, kind, tied)
    result = import_hf(str(folder), tmp_path / "run")
    assert result.architecture == kind and result.checkpoint.name == "step_00000000"
    model = tokenmill.load_model(tmp_path / "run")  # a normal run folder: latest valid checkpoint
    with torch.no_grad():
        assert (model(PROBE) - hf(PROBE).logits).abs().max().item() <= TOL
    assert prepare_run_dir(tmp_path / "run", resume=True).resume_from == result.checkpoint  # as --resume finds it
    assert (result.checkpoint / "tokenizer.json").is_file()
    tokenizer = tokenmill.load_tokenizer(result.checkpoint)
    assert tokenizer.encode(TEXTS[0]) == tokenmill.load_tokenizer(tmp_path / "run").encode(TEXTS[0])
    assert tokenizer.decode(tokenizer.encode(TEXTS[2])) == TEXTS[2]
    # the stored config is a complete run config pointing at the kept tokenizer
    cfg = load_config(None, tmp_path / "run" / "config.yaml")
    assert cfg.model.vocab_size == 320 and cfg.data.tokenizer == str(tmp_path / "run" / "tokenizer" / "tokenizer.json")


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa-untied", "qwen3"])
def test_export_import_export_is_weight_identical(make_run, tmp_path, arch):
    run, model, _ = make_run(arch)
    export_hf(run, tmp_path / "hf1", verify=False)
    import_hf(str(tmp_path / "hf1"), tmp_path / "imported")
    export_hf(tmp_path / "imported", tmp_path / "hf2", verify=False)
    first, second = load_file(tmp_path / "hf1" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)
    imported = tokenmill.load_model(tmp_path / "imported")
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))


def tiny_training(run, out_dir, corpus, *extra):
    """The imported run's own config, shrunk to a few CPU steps on a local corpus."""
    return load_config(
        None,
        run / "config.yaml",
        [
            f"train.out_dir={out_dir}",
            f"data.sources=[{corpus}]",
            "train.seq_len=16",
            "train.micro_batch_size=2",
            "train.device=cpu",
            "train.precision=fp32",
            "eval.interval_steps=0",
            "eval.max_batches=1",
            "eval.sample_tokens=2",
            "eval.sample_prompts=[x]",
            "log.progress_bar=false",
            "data.shuffle_buffer=4",
            "schedule.warmup_steps=0",
            *extra,
        ],
    )


@pytest.fixture
def imported_run(make_run, tmp_path):
    run, model, _ = make_run("llama-gqa-tied")
    export_hf(run, tmp_path / "hf", verify=False)
    import_hf(str(tmp_path / "hf"), tmp_path / "imported")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{TEXTS[i % 4]} ({i})" for i in range(200)), encoding="utf-8")
    return tmp_path / "imported", model, corpus


def final_weights(run_dir):
    return tokenmill.load_model(run_dir).state_dict()


ADAMW_AT_1E_9 = ("optim.name=adamw", "optim.lr=1e-9")  # a step that leaves the weights where they started


def test_init_from_starts_at_the_imported_weights(imported_run, tmp_path):
    from tokenmill.train.loop import train

    run, model, corpus = imported_run
    start = train(
        tiny_training(run, tmp_path / "cpt", corpus, f"train.init_from={run}", "train.max_steps=1", *ADAMW_AT_1E_9)
    )
    assert start.state.step == 1  # counters start fresh: not the imported checkpoint's
    weights, imported = final_weights(tmp_path / "cpt"), model.state_dict()
    assert max((weights[k] - imported[k]).abs().max().item() for k in imported) < 1e-6
    fresh = train(tiny_training(run, tmp_path / "fresh", corpus, "train.max_steps=1", *ADAMW_AT_1E_9))
    assert fresh.status == "completed"
    assert max((final_weights(tmp_path / "fresh")[k] - imported[k]).abs().max().item() for k in imported) > 1e-2


def test_resuming_an_init_from_run_needs_only_its_own_checkpoint(imported_run, tmp_path):
    import shutil

    from tokenmill.train.loop import train

    run, _, corpus = imported_run
    extra = (f"train.init_from={run}", "optim.lr=1e-2", "checkpoint.interval_steps=1", "schedule.name=constant")
    train(tiny_training(run, tmp_path / "straight", corpus, "train.max_steps=2", *extra))
    train(tiny_training(run, tmp_path / "split", corpus, "train.max_steps=1", *extra))
    config = tiny_training(run, tmp_path / "split", corpus, "train.max_steps=2", *extra)
    shutil.rmtree(run / "checkpoints")  # the weights it started from are gone: the resume reads its own
    train(config, resume=True)
    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_init_from_refusals(imported_run, tmp_path):
    from tokenmill.train.loop import train

    run, _, corpus = imported_run
    with pytest.raises(UserError, match="trained with tokenizer"):
        train(
            tiny_training(
                run, tmp_path / "a", corpus, f"train.init_from={run}", "train.max_steps=1", "data.tokenizer=byte"
            )
        )
    with pytest.raises(UserError, match="model.d_model"):
        train(
            tiny_training(
                run, tmp_path / "b", corpus, f"train.init_from={run}", "train.max_steps=1", "model.d_model=128"
            )
        )
    with pytest.raises(UserError, match="does not exist"):
        train(tiny_training(run, tmp_path / "c", corpus, f"train.init_from={tmp_path / 'nope'}", "train.max_steps=1"))


def test_import_bad_input_changes_nothing(tmp_path, bpe_file, assert_refused, cli, monkeypatch):
    folder, _ = hf_native(tmp_path, bpe_file, "gpt2", True)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused("import", folder, "--out", out, match="already exists")
    assert_refused("import", tmp_path / "missing", "--out", tmp_path / "new", match="neither a local model folder")
    assert_refused("import", "some-org/some-model", "--out", tmp_path / "new", match="offline")
    mistral = tmp_path / "hf-mistral"
    transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    ).save_pretrained(mistral)
    assert_refused("import", mistral, "--out", tmp_path / "new", match="model_type='mistral'")
    scaled = tmp_path / "hf-scaled"
    transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=320,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "rope_theta": 5e5,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ).save_pretrained(scaled)
    assert_refused("import", scaled, "--out", tmp_path / "new", match="RoPE scaling")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_refused("import", folder, "--out", tmp_path / "new", match=r"pip install 'tokenmill\[hf\]'")
    assert not (tmp_path / "new").exists()


def test_import_cli(tmp_path, bpe_file, cli):
    folder, _ = hf_native(tmp_path, bpe_file, "qwen3", False)
    code, out, _ = cli("import", folder, "--out", tmp_path / "run")
    assert code == 0 and "qwen3" in out and "train.init_from" in out
    assert tokenmill.load_model(tmp_path / "run").cfg.qk_norm

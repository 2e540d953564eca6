"""Supervised fine-tuning through the trainer: prompts add nothing to the loss or gradient but attention context,
exact resume, `train.init_from` + SFT from the CLI, the chat template in checkpoints, serve and export, and bad
input as one line with exit 2 and nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sft_helpers import chat_rows, qa_rows, write_rows
from tokenmill.checkpoint.folder import CHAT_TEMPLATE
from tokenmill.cli import main
from tokenmill.data.chat_template import DEFAULT_TEMPLATE, ChatRenderer, Segment
from tokenmill.data.sft import SftPacker
from tokenmill.data.sft_source import example_document
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.levers.loss import IGNORE_INDEX, plain_loss
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig
from tokenmill.parallel.engine import Engine
from tokenmill.train.loop import train
from train_helpers import (  # one_thread: autouse fixture
    assert_checkpoints_equal,
    checkpoints,
    cli_args,
    events,
    one_thread,  # noqa: F401
    tiny_config,
)

TOK = Tokenizer.byte()
WINDOW = 48


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=TOK.vocab_size, max_seq_len=64)
    return build_model(cfg)


def packed(*examples: tuple[str, str]) -> dict[str, torch.Tensor]:
    """One window holding the (prompt, completion) examples, packed as the SFT loader packs them."""
    packer = SftPacker(TOK, WINDOW)
    supply = iter(example_document([Segment(p, False), Segment(c, True)], False) for p, c in examples)
    return packer.batch([packer.next_window(lambda: next(supply, None))])


def only_example(batch: dict[str, torch.Tensor], doc: int) -> dict[str, torch.Tensor]:
    """The batch with every target outside example `doc` masked (target j belongs to token j + 1)."""
    targets = batch["targets"].clone()
    targets[batch["doc_ids"][:, 1:] != doc] = IGNORE_INDEX
    return {**batch, "targets": targets}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = plain_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-7, rtol=1e-6, msg=name)


def test_a_prompt_changes_nothing_of_the_other_examples_under_document_masking():
    model = tiny_model()
    base = packed(("12+30=", "42"), ("7+8=", "15"))
    changed = packed(("99-11=", "42"), ("7+8=", "15"))  # same length, other prompt tokens in example 0
    assert base["doc_ids"][0, :12].tolist() == [0] * 9 + [1] * 3  # both examples share the window
    loss_b, grads_b = loss_and_grads(model, only_example(base, 1))
    loss_c, grads_c = loss_and_grads(model, only_example(changed, 1))
    assert loss_b == loss_c
    assert_same_grads(grads_b, grads_c)
    # the prompt is context for its own completion: the changed example's loss moves
    assert loss_and_grads(model, only_example(base, 0))[0] != loss_and_grads(model, only_example(changed, 0))[0]
    # without document masking the second example would see the first one's prompt
    causal = {k: v for k, v in only_example(base, 1).items() if k != "doc_ids"}
    causal_changed = {k: v for k, v in only_example(changed, 1).items() if k != "doc_ids"}
    assert loss_and_grads(model, causal)[0] != loss_and_grads(model, causal_changed)[0]


def test_masked_positions_carry_no_loss_and_no_gradient():
    model = tiny_model()
    batch = packed(("12+30=", "42"), ("7+8=", "15"))
    loss, grads = loss_and_grads(model, batch)
    # the summed loss is the cross-entropy of the learned targets alone (completion tokens and EOS)
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1], batch["doc_ids"][:, :-1])
    learned = batch["targets"] != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[learned], batch["targets"][learned], reduction="sum")
    assert loss == pytest.approx(by_hand.item(), rel=1e-6)
    assert learned.sum().item() == len("42") + 1 + len("15") + 1
    # padding tokens (masked targets, a document of their own) change nothing at all
    repadded = {**batch, "tokens": batch["tokens"].clone()}
    pad = batch["doc_ids"] == 2
    repadded["tokens"][pad] = torch.randint(0, 256, (int(pad.sum()),), generator=torch.Generator().manual_seed(1))
    loss_r, grads_r = loss_and_grads(model, repadded)
    assert loss_r == loss
    assert_same_grads(grads, grads_r)


def _sft_rank_step(data: str) -> dict:
    """One DDP rank: its own SFT loader's micro-batch, the engine's global denominator, forward and backward."""
    from tokenmill.data.loader import build_loader
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.train.precision import Precision
    from tokenmill.train.sft import resolve_sft_config

    cfg = resolve_sft_config(_engine_config(data, "ddp"))
    dist = init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(0)
    engine = Engine(build_meta(cfg.model), cfg, dist, Precision("fp32", dist.device))
    batch = next(iter(build_loader(cfg, TOK, "train", engine.dp_rank, engine.dp_size)))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    denominator = engine.loss_denominator([batch])
    loss = engine.forward_backward(batch, scaler, denominator, sync=True)
    return {
        "batch": batch,
        "denominator": float(denominator),
        "loss": float(loss),
        "grads": {n: p.grad.clone() for n, p in engine.model.named_parameters()},
    }


def _engine_config(data: str, strategy: str):
    from tokenmill.config import config_from_dict

    return config_from_dict(
        {
            "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "vocab_size": 260, "max_seq_len": 64},
            "data": {"format": "prompt_completion", "sources": [data], "tokenizer": "byte", "eval_fraction": 0.0},
            "train": {"micro_batch_size": 2, "seq_len": WINDOW, "precision": "fp32", "device": "cpu"},
            "parallel": {"strategy": strategy, "timeout_s": 60},
        }
    )


@pytest.mark.slow
def test_the_denominator_is_the_global_count_of_completion_tokens_over_two_gloo_ranks(tmp_path):
    from dist_helpers import run_ranks

    data = str(write_rows(tmp_path / "qa.jsonl", qa_rows(60, seed=2)))
    results = run_ranks(_sft_rank_step, 2, data, timeout=120)
    valid = [int((r["batch"]["targets"] != IGNORE_INDEX).sum()) for r in results]
    assert valid[0] != valid[1]  # the ranks' batches hold different numbers of completion tokens
    assert all(r["denominator"] * 2 == sum(valid) for r in results)  # DDP averages the two ranks' gradients
    # one process over both ranks' rows, by hand: summed completion loss / every completion token of the step
    model = tiny_model_like(data)
    both = {k: torch.cat([r["batch"][k] for r in results]) for k in results[0]["batch"]}
    (plain_loss(model, both) / sum(valid)).backward()
    for name, param in model.named_parameters():
        for r in results:
            torch.testing.assert_close(r["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


def tiny_model_like(data: str) -> torch.nn.Module:
    """The single-process model the ranks built (same config and seed)."""
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.train.precision import Precision

    cfg = _engine_config(data, "single")
    torch.manual_seed(0)
    return Engine(build_meta(cfg.model), cfg, init_distributed(cfg.parallel, "cpu"), Precision("fp32", "cpu")).model


# ---------------------------------------------------------------------------------------------------------
# whole runs


def sft_overrides(tmp_path: Path, *extra: str) -> tuple[str, ...]:
    train_rows = write_rows(tmp_path / "train.jsonl", qa_rows(80) + chat_rows(40))
    val_rows = write_rows(tmp_path / "val.jsonl", qa_rows(16, seed=7))
    return (
        "data.format=prompt_completion",
        f"data.sources=[{train_rows}]",
        f"data.eval_sources=[{val_rows}]",
        "train.seq_len=63",
        "model.dropout=0.1",
        *extra,
    )


def sigterm_at_call(monkeypatch, call: int) -> None:
    """Ask this process to stop (SIGTERM) during the `call`-th micro-step of the next train()."""
    real = Engine.forward_backward
    seen = {"n": 0}

    def forward_backward(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "forward_backward", forward_backward)


def test_a_stopped_and_resumed_sft_run_equals_the_straight_run(tmp_path, monkeypatch):
    overrides = sft_overrides(tmp_path, "eval.interval_steps=3")
    straight = train(tiny_config(tmp_path / "straight", 6, *overrides))
    assert straight.status == "completed"
    cfg = tiny_config(tmp_path / "split", 6, *overrides)
    with monkeypatch.context() as patch:
        sigterm_at_call(patch, 3)
        first = train(cfg)
    assert (first.status, first.state.step) == ("stopped", 3)
    rest = train(cfg, resume=True)
    assert first.losses + rest.losses == straight.losses  # bitwise
    evals = [e["loss"] for e in events(tmp_path / "split", "eval")]
    assert evals == [e["loss"] for e in events(straight.run_dir, "eval")] and len(evals) == 2  # SFT eval runs
    assert_checkpoints_equal(checkpoints(tmp_path / "split")[-1], checkpoints(straight.run_dir)[-1])
    shares = [e["valid_token_share"] for e in events(straight.run_dir, "train")]
    assert len(shares) == 6 and all(0.0 < s < 0.6 for s in shares)  # prompts and padding carry no loss


def test_init_from_then_sft_from_the_cli_records_the_chat_template(tmp_path):
    pretrained = tmp_path / "pretrained"
    assert main(cli_args(pretrained, 2)) == 0
    run = tmp_path / "sft"
    # data.tokenizer=bpe (the default) takes the tokenizer of the checkpoint SFT starts from
    args = cli_args(run, 3, *sft_overrides(tmp_path), f"train.init_from={pretrained}", "data.tokenizer=bpe")
    assert main(args) == 0
    folder = checkpoints(run)[-1]
    assert (folder / CHAT_TEMPLATE).read_text() == DEFAULT_TEMPLATE
    saved = (folder / "config.yaml").read_text()
    assert "tokenizer: byte" in saved and "document_masking: true" in saved

    from tokenmill.serve.chat import encode_chat_prompt, find_chat_template

    served = find_chat_template(folder, TOK)
    assert served is not None and served.text == DEFAULT_TEMPLATE
    messages = chat_rows(1)[0]["messages"]
    trained_prompt = ChatRenderer(DEFAULT_TEMPLATE, "default", TOK).segments(messages)[0]
    assert not trained_prompt.learned
    # the server feeds exactly the tokens the first answer was trained after
    assert encode_chat_prompt(TOK, served.render(messages[:1])) == TOK.encode(trained_prompt.text)


def test_generate_chat_answers_through_the_recorded_template(tmp_path, capsys):
    pretrained = tmp_path / "pretrained"
    assert main(cli_args(pretrained, 2)) == 0
    run = tmp_path / "sft"
    assert main(cli_args(run, 2, *sft_overrides(tmp_path), f"train.init_from={pretrained}")) == 0
    capsys.readouterr()
    question = "what is 2+2?"
    greedy = ["--max-tokens", "5", "--temperature", "0"]
    assert main(["generate", str(run), "--prompt", question, "--chat", *greedy]) == 0
    answer = capsys.readouterr().out.rstrip("\n")

    from tokenmill.api import load_model
    from tokenmill.generation.engine import Generator
    from tokenmill.generation.params import SamplingParams
    from tokenmill.serve.chat import encode_chat_prompt, find_chat_template

    folder = checkpoints(run)[-1]
    prompt = encode_chat_prompt(TOK, find_chat_template(folder, TOK).render([{"role": "user", "content": question}]))
    expected = Generator(load_model(folder), TOK).generate([prompt], SamplingParams(max_new_tokens=5, temperature=0))
    assert answer == expected[0].text  # the template's prompt was fed, and only the answer printed

    assert main(["generate", str(pretrained), "--prompt", question, "--chat", *greedy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0]


def test_export_writes_the_chat_template_into_tokenizer_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenmill.interop.export import export_hf

    run = tmp_path / "sft"
    assert main(cli_args(run, 1, *sft_overrides(tmp_path))) == 0
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_TEMPLATE
    messages = chat_rows(1)[0]["messages"][:1]
    hf_text = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert hf_text == ChatRenderer(DEFAULT_TEMPLATE, "default", TOK).render(messages, add_generation_prompt=True)


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


BAD_INPUT = [
    ("missing", "line 2: missing field 'completion'"),
    ("not_jinja", "is not valid Jinja"),
    ("no_template_file", "data.chat_template='{tmp}/nope.jinja': no such file"),
    ("bpe_without_init", "data.tokenizer=bpe would train a new tokenizer"),
    ("bad_format", "data.format='chat' is not allowed"),
]


@pytest.mark.parametrize("case,message", BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_bad_sft_input_is_one_line_exit_2_and_the_previous_run_is_kept(tmp_path, capsys, case, message):
    good = write_rows(tmp_path / "good.jsonl", qa_rows(30))
    run = tmp_path / "run"
    assert main(cli_args(run, 1, "data.format=prompt_completion", f"data.sources=[{good}]", "train.seq_len=63")) == 0
    bad = write_rows(tmp_path / "bad.jsonl", [qa_rows(1)[0], {"prompt": "x"}])
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    extra = {
        "missing": [f"data.sources=[{bad}]"],
        "not_jinja": [f"data.chat_template={tmp_path / 'broken.jinja'}"],
        "no_template_file": [f"data.chat_template={tmp_path / 'nope.jinja'}"],
        "bpe_without_init": ["data.tokenizer=bpe"],
        "bad_format": ["data.format=chat"],
    }[case]
    before = tree(tmp_path)
    capsys.readouterr()
    args = cli_args(run, 2, "data.format=prompt_completion", f"data.sources=[{good}]", "train.seq_len=63", *extra)
    assert main([*args, "--overwrite"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert message.format(tmp=tmp_path) in err[0], err[0]
    assert tree(tmp_path) == before  # the previous run's checkpoint and logs are untouched


def test_a_run_reports_truncated_examples_at_its_end(tmp_path):
    rows = write_rows(tmp_path / "long.jsonl", qa_rows(40, max_words=12))  # 20..90 tokens
    cfg = tiny_config(
        tmp_path / "run", 2, "data.format=prompt_completion", f"data.sources=[{rows}]", "train.seq_len=31"
    )
    with pytest.warns(UserWarning, match="truncated to its first 32 tokens"):
        assert train(cfg).status == "completed"
    lines = [e["message"] for e in events(tmp_path / "run", "warning") if "SFT examples" in e["message"]]
    assert len(lines) == 1 and "were longer than train.seq_len + 1 tokens and were truncated" in lines[0]

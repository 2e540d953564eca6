"""Loss / perplexity / bits per byte over a whole source (`tokenmill eval --source`): every prediction is scored
once, the numbers equal the training loss computed by hand on the same windows, shards work, and repeated runs
agree exactly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from tokenmill.api import create_model
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.config import load_config
from tokenmill.data.tokenizer import Tokenizer, train_bpe
from tokenmill.errors import UserError
from tokenmill.eval.source import score_source, windows
from tokenmill.metrics.sinks import read_jsonl

DOCS = [f"Document {i}: déjà vu, naïve café {'x' * (i % 7)} and 日本 {i * 37}." for i in range(12)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = load_config(
        ["tiny"],
        overrides=[
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            "model.vocab_size=320",
            "model.max_seq_len=32",
        ],
    )
    return create_model(cfg).eval(), cfg


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return path


def stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    """The training layout: EOS after every document, one EOS in front of the first."""
    out = [tok.eos_id]
    for doc in docs:
        out += tok.encode(doc) + [tok.eos_id]
    return out


@pytest.mark.parametrize("n, length, stride", [(1, 4, 4), (2, 4, 4), (13, 4, 4), (13, 4, 3), (30, 8, 1), (9, 8, 5)])
def test_windows_score_every_prediction_once(n, length, stride):
    tokens = np.arange(n)
    pieces = np.split(tokens, sorted(random.Random(n).sample(range(1, n), min(3, n - 1)))) if n > 1 else [tokens]
    scored, first = [], True
    for window, k in windows(pieces, length, stride):
        assert 2 <= len(window) <= length + 1 and 1 <= k <= len(window) - 1
        assert np.array_equal(window, np.arange(window[0], window[0] + len(window)))  # consecutive stream tokens
        if not first:
            assert len(window) - 1 - k >= length - stride  # each new prediction keeps this much context
        scored += window[-k:].tolist()
        first = False
    assert scored == list(range(1, n))


def test_score_equals_the_training_loss_on_the_same_windows(model, corpus):
    model, _ = model
    tok = Tokenizer.byte()
    result = score_source(model, tok, str(corpus), seq_len=16, batch_size=3)
    ids = stream(tok, DOCS)
    nats = sum(model.loss(torch.tensor([ids[s : s + 17]]), reduction="sum").item() for s in range(0, len(ids) - 1, 16))
    text_bytes = sum(len(d.encode()) for d in DOCS)
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == text_bytes and result["documents"] == len(DOCS)
    assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["bpb"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)
    assert score_source(model, tok, str(corpus), seq_len=16, batch_size=3) == result  # the same number every time
    assert score_source(model, tok, str(corpus), seq_len=16, batch_size=5)["loss"] == pytest.approx(
        result["loss"], rel=1e-6
    )


def test_sliding_windows_score_each_token_with_more_context(model, corpus):
    model, _ = model
    tok = Tokenizer.byte()
    ids = stream(tok, DOCS)
    result = score_source(model, tok, str(corpus), seq_len=16, stride=4)
    nats, done = 0.0, 0
    for begin in range(0, len(ids), 4):  # by hand: window [begin, begin+16), keep the predictions not yet scored
        end = min(begin + 16, len(ids) - 1)
        if end <= done:
            break
        with torch.no_grad():
            logp = model(torch.tensor([ids[begin:end]]))[0].log_softmax(-1)
        targets = torch.tensor(ids[begin + 1 : end + 1])
        per_token = -logp.gather(1, targets[:, None])[:, 0]
        nats += per_token[-(end - done) :].sum().item()
        done = end
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert result["loss"] != pytest.approx(score_source(model, tok, str(corpus), seq_len=16)["loss"], rel=1e-4)


def test_shards_are_scored_per_shard_file(model, tmp_path):
    from tokenmill.data.prepare import prepare_documents
    from tokenmill.data.shards import open_shards

    model, _ = model
    tok = Tokenizer.byte()
    prepare_documents(
        DOCS, tok, tmp_path / "shards", tokenizer_spec="byte", source="docs", eval_fraction=0.3, shard_tokens=300
    )
    nats, tokens = 0.0, 0
    for split in ("train", "eval"):
        shard_set = open_shards(tmp_path / "shards", split, tok)
        for shard in shard_set.shards:
            ids = [tok.eos_id, *np.fromfile(shard.path, dtype=shard_set.dtype).tolist()]
            nats += sum(
                model.loss(torch.tensor([ids[s : s + 17]]), reduction="sum").item() for s in range(0, len(ids) - 1, 16)
            )
            tokens += len(ids) - 1
    result = score_source(model, tok, str(tmp_path / "shards"), seq_len=16)
    assert result["documents"] == len(DOCS) and result["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert result["tokens"] == tokens and result["loss"] == pytest.approx(nats / tokens, rel=1e-6)
    assert score_source(model, tok, str(tmp_path / "shards"), seq_len=16, split="eval")["tokens"] < tokens
    with pytest.raises(UserError, match="built with tokenizer"):
        score_source(model, train_bpe(DOCS, 300, progress=False), str(tmp_path / "shards"), seq_len=16)


@pytest.fixture
def saved_run(model, tmp_path):
    model, _ = model
    cfg = load_config(
        ["tiny"],
        overrides=[
            *(
                f"model.{k}={v}"
                for k, v in (
                    ("n_layers", 1),
                    ("d_model", 32),
                    ("n_heads", 2),
                    ("n_kv_heads", 1),
                    ("vocab_size", 320),
                    ("max_seq_len", 32),
                )
            ),
            "data.tokenizer=byte",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    Checkpointer(tmp_path / "run", cfg.checkpoint, {"model": model}, run_config=cfg).save(7)
    return tmp_path / "run"


def test_cli_prints_saves_and_logs_the_same_numbers(saved_run, corpus, capsys):
    from tokenmill.cli import main

    outputs = []
    for _ in range(2):
        assert main(["eval", str(saved_run), "--source", str(corpus), "--seq-len", "16"]) == 0
        outputs.append(capsys.readouterr().out.splitlines()[-1])
    assert outputs[0] == outputs[1] and "bpb" in outputs[0]
    saved = json.loads((saved_run / "eval" / "step_00000007-source-docs.jsonl.json").read_text())
    events = read_jsonl(saved_run / "metrics.jsonl", "eval_source")
    assert len(events) == 2 and events[0]["loss"] == events[1]["loss"] == saved["loss"]
    assert events[0]["step"] == 7 and f"bpb {saved['bpb']:.4f}" in outputs[0]


def test_cli_bad_input_changes_nothing(saved_run, corpus, tmp_path, capsys):
    from tokenmill.cli import main

    def refused(*args: str) -> str:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert main(["eval", *map(str, args)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        return err[0]

    assert "does not exist" in refused(tmp_path / "missing", "--source", corpus)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert "no valid checkpoint" in refused(tmp_path / "empty", "--source", corpus)
    assert "nothing to evaluate" in refused(saved_run)
    assert "no such file" in refused(saved_run, "--source", tmp_path / "nope.jsonl")
    assert "--seq-len" in refused(saved_run, "--source", corpus, "--seq-len", "99")
    assert "--stride" in refused(saved_run, "--source", corpus, "--seq-len", "8", "--stride", "9")

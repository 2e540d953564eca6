"""`tokenmill data check`: 0.0% duplicates when sharding is right, > 0 when it is broken; bad shard folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.data.check import run_check
from tokenmill.data.prepare import prepare_documents
from tokenmill.data.tokenizer import Tokenizer, train_bpe

WORDS = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white", "grey", "orange", "purple", "brown"]


def documents(n=400):
    rng = np.random.default_rng(1)
    return [f"{d}: " + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(5, 80))) for d in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "shards"
    prepare_documents(
        documents(), Tokenizer.byte(), out, tokenizer_spec="byte", source="test", eval_fraction=0.05, shard_tokens=20000
    )
    return out


def args(folder, *extra):
    return [
        "data",
        "check",
        "--preset",
        "tiny",
        f"--data.sources=[{folder}]",
        "--data.tokenizer=byte",
        "--train.seq_len=63",
        "--train.micro_batch_size=4",
        *extra,
    ]


def test_correct_setup_prints_zero_duplicates(shards, capsys):
    assert main(args(shards, "--batches", "12", "--ranks", "2", "--workers", "2")) == 0
    out = capsys.readouterr().out
    assert "duplicate windows" in out and "0.0% (0)" in out
    assert "ok (" in out  # shard checksums verified


def test_broken_setup_shows_duplicates(shards, capsys):
    assert main(args(shards, "--batches", "6", "--ranks", "2", "--same-rank", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["duplicate_windows"] == report["windows"] // 2  # the second "rank" repeats the first
    assert report["duplicate_rate"] == pytest.approx(0.5)
    assert report["epoch_windows"] > report["windows"]  # the duplicates are not from a second epoch
    cfg = load_config(
        ["tiny"],
        None,
        [f"--data.sources=[{shards}]", "--data.tokenizer=byte", "--train.seq_len=63", "--train.micro_batch_size=4"],
    )
    ok = run_check(cfg, Tokenizer.byte(), 6, 3, 0)
    assert ok.duplicate_windows == 0 and ok.windows == 3 * 6 * 4


def test_statistics_are_right(shards):
    cfg = load_config(
        ["tiny"],
        None,
        [f"--data.sources=[{shards}]", "--data.tokenizer=byte", "--train.seq_len=63", "--train.micro_batch_size=4"],
    )
    tok = Tokenizer.byte()
    report = run_check(cfg, tok, 5, 1, 0)
    assert report.tokens == 5 * 4 * 64
    assert report.unique_tokens <= len(set("".join(documents()))) + 1  # characters of the corpus + EOS
    # mean document is ~250 bytes, so most 64-token windows hold one document and a few span two
    assert 0.0 < report.boundary_share < 0.7
    assert 0.0 < report.eos_share < 0.05
    assert report.top_tokens[0]["text"] == " "  # the space between words is the most common byte


def test_streaming_source_zero_duplicates(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(200)))
    assert (
        main(
            [
                "data",
                "check",
                "--preset",
                "tiny",
                f"--data.sources=[{src}]",
                "--data.tokenizer=byte",
                "--train.seq_len=63",
                "--train.micro_batch_size=2",
                "--batches",
                "5",
                "--ranks",
                "2",
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["windows"] == 20 and report["duplicate_windows"] == 0
    assert report["checksums"] == "not checked"


def test_bad_shard_folders_one_line_errors(shards, tmp_path, capsys):
    import shutil

    # missing folder
    assert main(args(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "\n" not in err
    # shards built with another tokenizer
    bpe = train_bpe(documents(50), 300, tmp_path / "bpe", progress=False)
    assert (
        main(
            args(shards)[:-3]
            + [
                f"--data.tokenizer={tmp_path / 'bpe' / 'tokenizer.json'}",
                "--train.seq_len=63",
                "--train.micro_batch_size=4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert bpe.hash in err and Tokenizer.byte().hash in err and "prepare" in err and "\n" not in err
    # a truncated shard: the error names the file
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    victim = broken / "train-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-10])
    assert main(args(broken)) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum error" in err and "train-00001.bin" in err and "\n" not in err
    # same size, damaged bytes: caught by the sha256 pass of data check
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    victim = damaged / "train-00000.bin"
    data = bytearray(victim.read_bytes())
    data[-4] ^= 0x01
    victim.write_bytes(bytes(data))
    assert main(args(damaged, "--batches", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum error" in err and "train-00000.bin" in err

"""Documents that lose text are counted and reported; a malformed JSON line is one error line naming file and line."""

from __future__ import annotations

import hashlib
import json

import pytest

from data_helpers import make_cfg, make_docs
from tokenmill.cli import main
from tokenmill.data.loader import build_loader
from tokenmill.data.quality import DocCounts, loader_problem_lines, problem_lines
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

TOK = Tokenizer.byte()


def write_rows(path, texts):
    """One JSON object per line with `text` exactly as given (None, numbers, objects included)."""
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def lossy_rows(n=200):
    """Every 4th text null, every 10th a number, one with undecodable bytes (as U+FFFD after decoding)."""
    docs = make_docs(n, max_words=12)
    return [None if i % 4 == 1 else 7 if i % 10 == 3 else d for i, d in enumerate(docs)]


def test_problem_lines_warn_above_the_threshold():
    quiet = DocCounts(read=1000, null=5, replaced_docs=1, replaced_chars=3).to_dict()
    loud = DocCounts(read=1000, null=300).to_dict()
    lines = problem_lines({"a.jsonl": quiet, "b.jsonl": loud, "clean.jsonl": DocCounts(read=50).to_dict()})
    assert lines == [
        "note: data source a.jsonl: 5 of 1,000 documents read (0.5%) had no text (null or not a string in the text "
        "field) and were skipped",
        "note: data source a.jsonl: 1 of 1,000 documents read (0.1%) held bytes that are not valid UTF-8, replaced "
        "by 3 U+FFFD characters",
        "warning: data source b.jsonl: 300 of 1,000 documents read (30.0%) had no text (null or not a string in the "
        "text field) and were skipped",
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_loader_counts_null_and_non_text_documents_per_source(tmp_path, stream):
    texts = lossy_rows()
    bad = write_rows(tmp_path / "bad.jsonl", texts)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "broken \xff\xfe bytes"}\n' * 20)
    cfg = make_cfg([f"{bad}:0.5", f"{tmp_path / 'bytes.jsonl'}:0.5"], seq_len=15, batch=2, shuffle=0, stream=stream)
    loader = build_loader(cfg, TOK, "train", epochs=1)
    windows = sum(b["tokens"].shape[0] for b in loader)
    stats = loader.stats()
    assert windows > 0 and stats["batches"] > 0
    counts = stats["sources"][str(bad)]
    nulls = sum(1 for t in texts if not isinstance(t, str))
    assert counts["read"] == len(texts) and counts["null"] == nulls  # every epoch document, each once
    assert stats["sources"][str(tmp_path / "bytes.jsonl")]["replaced_docs"] == 20
    lines = loader_problem_lines(stats)
    assert any(
        line.startswith("warning:") and str(bad) in line and f"{nulls} of {len(texts)}" in line for line in lines
    )
    assert any("not valid UTF-8" in line and "bytes.jsonl" in line for line in lines)


def test_counts_survive_a_resume(tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", lossy_rows(400))
    cfg = make_cfg([str(bad)], seq_len=15, batch=2, shuffle=0)
    loader = build_loader(cfg, TOK, "train")
    it = iter(loader)
    for _ in range(5):
        next(it)
    before = loader.stats()["sources"][str(bad)]["null"]
    resumed = build_loader(cfg, TOK, "train")
    resumed.load_state_dict(loader.state_dict())
    next(iter(resumed))
    assert before > 0 and resumed.stats()["sources"][str(bad)]["null"] >= before


def test_a_source_without_text_is_not_blamed_on_ranks(tmp_path, capsys):
    empty = write_rows(tmp_path / "nulls.jsonl", [None] * 30)
    assert (
        main(
            [
                "data",
                "check",
                "--preset",
                "tiny",
                f"--data.sources=[{empty}]",
                "--data.tokenizer=byte",
                "--train.seq_len=15",
                "--batches",
                "2",
                "--ranks",
                "2",
                "--workers",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "none of the 15 documents read has text (15 null" in err and "data.text_field" in err
    assert "ranks" not in err and "\n" not in err


def test_data_check_and_prepare_report_lossy_documents(tmp_path, capsys):
    bad = write_rows(tmp_path / "bad.jsonl", lossy_rows())
    assert (
        main(
            [
                "data",
                "check",
                "--preset",
                "tiny",
                f"--data.sources=[{bad}]",
                "--data.tokenizer=byte",
                "--train.seq_len=15",
                "--train.micro_batch_size=2",
                "--batches",
                "3",
                "--ranks",
                "2",
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["sources"][str(bad)]["null"] > 0
    assert "warning: data source" in captured.err and "had no text" in captured.err
    assert "duplicate" not in captured.err  # a data problem, not a sharding one
    out = tmp_path / "shards"
    assert main(["prepare", str(bad), "--tokenizer", "byte", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    nulls = sum(1 for t in lossy_rows() if not isinstance(t, str))
    assert f"warning: data source {bad}: {nulls} of 200 documents read" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"]["null"] == nulls
    stats = build_loader(make_cfg([str(out)], seq_len=15, batch=2), TOK, "train").stats()
    assert any(f"{nulls} of 200" in line for line in loader_problem_lines(stats))  # shown by train from shards


def malformed(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": d}) for d in make_docs(40)]
    lines[16] = '{"text": "unterminated, }'
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_jsonl_line_is_one_line_naming_file_and_line(tmp_path, stream):
    path = malformed(tmp_path)
    with pytest.raises(UserError) as err:
        loader = build_loader(make_cfg([str(path)], seq_len=15, batch=2, stream=stream), TOK, "train")
        next(iter(loader))
    message = str(err.value)
    assert f"{path} line 17: not valid JSON" in message and "\n" not in message


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "command",
    [
        lambda src, out: ["prepare", str(src), "--tokenizer", "byte", "--out", str(out), "--no-progress"],
        lambda src, out: [
            "data",
            "check",
            "--preset",
            "tiny",
            f"--data.sources=[{src}]",
            "--data.tokenizer=byte",
            "--train.seq_len=15",
            "--batches",
            "2",
        ],
        lambda src, out: [
            "train",
            "--preset",
            "tiny",
            f"--data.sources=[{src}]",
            "--data.tokenizer=byte",
            f"--train.out_dir={out}",
            "--train.max_steps=1",
        ],
    ],
)
def test_malformed_jsonl_cli_exit_2_one_line(tmp_path, capsys, command):
    path = malformed(tmp_path)
    before = digest(tmp_path)
    assert main(command(path, tmp_path / "out")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "line 17" in err[0] and "Traceback" not in err[0]
    after = digest(tmp_path)
    assert {k: after[k] for k in before} == before  # nothing that existed was changed

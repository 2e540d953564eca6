"""`tokenmill prepare`: round trip, manifest, dtype choice, resume after interruption, split, refusals, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.cli import main
from tokenmill.data import prepare as prepare_module
from tokenmill.data.mixture import is_eval_doc
from tokenmill.data.prepare import prepare_documents
from tokenmill.data.shards import open_shards, read_manifest, sha256_file
from tokenmill.data.tokenizer import Tokenizer, train_bpe
from tokenmill.errors import UserError

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
]


def corpus(n=300):
    """Deterministic documents of varied length (two identical ones, and an empty one that must vanish)."""
    rng = np.random.default_rng(0)
    docs = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(1, 60))) + f" #{d} é" for d in range(n)]
    return docs[:100] + ["", docs[5]] + docs[100:]


class WideTokenizer:
    """A byte tokenizer shifted above 65535, so its ids need uint32 (stands in for a 128K-vocab tokenizer)."""

    hash, vocab_size, eos_id, bos_id, name = "wide-test", 70000, 69999, 69998, "wide"

    def encode_batch(self, texts):
        return [[65000 + b for b in t.encode()] for t in texts]


def prepare(docs, tok, out, **kw):
    kw = {"tokenizer_spec": "test", "source": "memory", "eval_fraction": 0.2, "shard_tokens": 2000, **kw}
    return prepare_documents(docs, tok, out, **kw)


def split_docs(folder, split, tok=None):
    """Per-document token lists of a split, cut with the document index."""
    shard_set = open_shards(folder, split, tok, verify="full")
    docs = []
    for shard in shard_set.shards:
        tokens = np.fromfile(shard.path, dtype=shard_set.dtype)
        starts = np.load(shard.index_path)
        docs += [tokens[a:b].tolist() for a, b in zip(starts, [*starts[1:], tokens.size])]
    return docs


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus(200), 300, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_bpe(tmp_path, bpe, workers):
    docs = corpus()
    prepare(docs, bpe, tmp_path / "d", workers=workers)
    for split, want_eval in (("train", False), ("eval", True)):
        expected = [
            ids + [bpe.eos_id]
            for text, ids in zip(docs, bpe.encode_batch(docs))
            if text and is_eval_doc(text, 0.2) == want_eval
        ]
        got = split_docs(tmp_path / "d", split, bpe)
        assert got == expected
        assert [bpe.decode(d[:-1]) for d in got] == [t for t in docs if t and is_eval_doc(t, 0.2) == want_eval]


def test_manifest_counts_and_checksums(tmp_path):
    tok = Tokenizer.byte()
    docs = corpus()
    prepare(docs, tok, tmp_path / "d")
    m = read_manifest(tmp_path / "d")
    assert m["complete"] and m["dtype"] == "uint16"
    assert m["tokenizer"] == {"hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "spec": "test"}
    nonempty = [d for d in docs if d]
    assert m["splits"]["train"]["docs"] + m["splits"]["eval"]["docs"] == len(nonempty)
    assert m["source_docs"] == len(docs)
    total = sum(len(d.encode()) + 1 for d in nonempty)
    assert m["splits"]["train"]["tokens"] + m["splits"]["eval"]["tokens"] == total
    assert len(m["chunks"]) > 3  # shard_tokens=2000 cuts this corpus into several chunks
    for info in m["splits"].values():
        assert info["tokens"] == sum(e["tokens"] for e in info["shards"])
        for e in info["shards"]:
            assert (tmp_path / "d" / e["file"]).stat().st_size == 2 * e["tokens"]
            assert sha256_file(tmp_path / "d" / e["file"]) == e["sha256"]
            assert np.load(tmp_path / "d" / e["index"]).size == e["docs"]


def test_uint32_for_large_vocab(tmp_path):
    tok = WideTokenizer()
    docs = corpus(40)
    prepare(docs, tok, tmp_path / "d", eval_fraction=0.0)
    assert read_manifest(tmp_path / "d")["dtype"] == "uint32"
    got = split_docs(tmp_path / "d", "train")
    assert got == [[65000 + b for b in d.encode()] + [69999] for d in docs if d]  # ids > 65535 survive


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "TASK_DOCS", 16)  # small tasks, so chunks complete before the crash
    tok = Tokenizer.byte()
    docs = corpus()
    prepare(docs, tok, tmp_path / "whole")

    def crashing(limit):
        for i, d in enumerate(docs):
            if i == limit:
                raise KeyboardInterrupt  # the process dies mid-run
            yield d

    with pytest.raises(KeyboardInterrupt):
        prepare(crashing(150), tok, tmp_path / "part")
    partial = read_manifest(tmp_path / "part")
    assert not partial["complete"] and 0 < len(partial["chunks"]) < len(read_manifest(tmp_path / "whole")["chunks"])
    with pytest.raises(UserError, match="unfinished prepare"):
        open_shards(tmp_path / "part", "train")
    stats = prepare(docs, tok, tmp_path / "part")
    assert stats.resumed_chunks == len(partial["chunks"])
    whole, part = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "part")
    assert whole == part
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "part").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()


def test_eval_and_train_share_no_document(tmp_path):
    tok = Tokenizer.byte()
    docs = corpus()
    prepare(docs, tok, tmp_path / "d", eval_fraction=0.3)
    train = {tok.decode(d[:-1]) for d in split_docs(tmp_path / "d", "train")}
    evald = {tok.decode(d[:-1]) for d in split_docs(tmp_path / "d", "eval")}
    assert train and evald
    assert not train & evald
    assert train | evald == {d for d in docs if d}


def test_refuses_other_dataset_unless_overwrite(tmp_path):
    tok = Tokenizer.byte()
    docs = corpus(50)
    prepare(docs, tok, tmp_path / "d")
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    assert prepare(docs, tok, tmp_path / "d").resumed_chunks == -1  # same settings: nothing to do
    with pytest.raises(UserError, match="different prepared dataset"):
        prepare(docs, tok, tmp_path / "d", eval_fraction=0.5)
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before  # nothing overwritten
    prepare(docs, tok, tmp_path / "d", eval_fraction=0.5, overwrite=True)
    assert read_manifest(tmp_path / "d")["settings"]["eval_fraction"] == 0.5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare(docs, tok, tmp_path / "other")


def test_cli_prepare_jsonl(tmp_path, capsys):
    docs = [d for d in corpus(60) if d]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "shards"
    code = main(
        [
            "prepare",
            str(src),
            "--tokenizer",
            "byte",
            "--out",
            str(out),
            "--workers",
            "2",
            "--text-field",
            "content",
            "--eval-fraction",
            "0.1",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MB/s" in printed and "train:" in printed
    m = read_manifest(out)
    assert m["splits"]["train"]["docs"] + m["splits"]["eval"]["docs"] == len(docs)


def test_cli_prepare_bad_inputs(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "missing.jsonl"),
                "--tokenizer",
                "byte",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.jsonl" in err and "\n" not in err
    assert main(["prepare", "stdlib", "--tokenizer", "bpe", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "tokenizer train" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["byte", "bpe-file"])
def test_default_bpe_setting_uses_the_shards_tokenizer(tmp_path, bpe, tokenizer):
    from types import SimpleNamespace

    from tokenmill.data.tokenizer import build_tokenizer

    docs = [d for d in corpus(40) if d]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = "byte"
    if tokenizer == "bpe-file":
        bpe.save(tmp_path / "tok")
        spec = str(tmp_path / "tok")
    out = tmp_path / "shards"
    assert main(["prepare", str(src), "--tokenizer", spec, "--out", str(out), "--no-progress"]) == 0
    data_cfg = SimpleNamespace(
        tokenizer="bpe", sources=[str(out)], text_field="text", tokenizer_vocab_size=512, tokenizer_train_chars=0
    )
    built = build_tokenizer(data_cfg, tmp_path / "cache")
    assert built.hash == read_manifest(out)["tokenizer"]["hash"]
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_only_its_own_temp_files_are_removed_and_only_from_an_accepted_folder(tmp_path):
    tok = Tokenizer.byte()
    docs = corpus(50)
    refused = tmp_path / "refused"
    refused.mkdir()
    mine = {".draft.tmp1": b"user notes", ".train-00000.bin.tmp77": b"looks like ours"}
    for name, data in mine.items():
        (refused / name).write_bytes(data)
    with pytest.raises(UserError, match="not empty"):
        prepare(docs, tok, refused)  # a folder it refuses: nothing is touched, not even its own pattern
    assert {p.name: p.read_bytes() for p in refused.iterdir()} == mine

    done = tmp_path / "done"
    prepare(docs, tok, done)
    (done / ".train-00001.bin.tmp4242").write_bytes(b"left by a killed run")
    (done / ".draft.tmp1").write_bytes(b"user notes")
    (done / "train-notes.bin").write_bytes(b"user file with a shard-like name")
    assert prepare(docs, tok, done).resumed_chunks == -1  # accepted (same dataset): its own leftovers go
    assert not (done / ".train-00001.bin.tmp4242").exists()
    assert (done / ".draft.tmp1").read_bytes() == b"user notes"
    assert (done / "train-notes.bin").read_bytes() == b"user file with a shard-like name"
    prepare(docs, tok, done, eval_fraction=0.5, overwrite=True)  # overwrite replaces the dataset, not user files
    assert (done / ".draft.tmp1").exists() and (done / "train-notes.bin").exists()
    assert read_manifest(done)["settings"]["eval_fraction"] == 0.5


def test_a_folder_holding_only_its_own_leftovers_counts_as_empty(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".manifest.json.tmp9").write_bytes(b"{")  # killed before the first manifest rename
    prepare(corpus(30), Tokenizer.byte(), out)
    assert not (out / ".manifest.json.tmp9").exists() and read_manifest(out)["complete"]

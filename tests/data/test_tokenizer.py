"""Tokenizers: byte round trip, BPE training on the stdlib corpus, stable hash, loading, bad inputs, CLI."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from data_helpers import make_cfg, make_docs, write_jsonl
from tokenmill.cli import tokenizer as tokenizer_cli
from tokenmill.data.sources import StdlibSource
from tokenmill.data.tokenizer import BOS, EOS, Tokenizer, build_tokenizer, check_vocab, load_tokenizer, train_bpe
from tokenmill.errors import UserError

TRAIN_CHARS = 600_000  # a slice of the stdlib corpus: a couple of seconds of BPE training


@pytest.fixture(scope="module")
def stdlib_texts() -> list[str]:
    return list(StdlibSource().iter_texts(max_chars=TRAIN_CHARS))


@pytest.fixture(scope="module")
def bpe(stdlib_texts, tmp_path_factory) -> Tokenizer:
    return train_bpe(iter(stdlib_texts), 512, tmp_path_factory.mktemp("bpe"), progress=False)


def test_byte_tokenizer_round_trips_and_keeps_specials_apart():
    tok = Tokenizer.byte()
    text = "héllo, wörld ✓ <|eos|>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (259, 256, 257)
    assert tok.eos_id not in ids  # the text "<|eos|>" is not an end of document
    assert tok.decode([104, 105, tok.eos_id, tok.bos_id]) == "hi" + EOS + BOS
    assert Tokenizer.byte().hash == tok.hash


def test_bpe_trained_on_stdlib_round_trips(bpe, stdlib_texts):
    assert bpe.vocab_size == 512
    assert (bpe.eos_id, bpe.bos_id) == (0, 1)
    docs = stdlib_texts[:20]
    encoded = bpe.encode_batch(docs)
    for doc, ids in zip(docs, encoded):
        assert bpe.decode(ids) == doc
        assert max(ids) < bpe.vocab_size and bpe.eos_id not in ids
    n_bytes = sum(len(d.encode()) for d in docs)
    assert sum(map(len, encoded)) < 0.6 * n_bytes  # merges learnt something real
    unseen = "def f(x):\n    return {'ünïcode': x ** 2}  # <|eos|>\n"
    ids = bpe.encode(unseen)
    assert bpe.decode(ids) == unseen and bpe.eos_id not in ids


def test_bpe_hash_is_stable_across_trainings_and_loads(bpe, stdlib_texts, tmp_path):
    again = train_bpe(iter(stdlib_texts), 512, tmp_path / "again", progress=False)
    assert again.hash == bpe.hash
    loaded = Tokenizer.from_file(tmp_path / "again" / "tokenizer.json")
    assert loaded.hash == bpe.hash
    assert loaded.encode_batch(stdlib_texts[:3]) == bpe.encode_batch(stdlib_texts[:3])
    other = train_bpe(iter(stdlib_texts), 400, None, progress=False)
    assert other.hash != bpe.hash


def test_load_tokenizer_json_with_foreign_specials(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>"])  # GPT-2 style: one token is both BOS and EOS
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id == tok.bos_id == 3 and tok.vocab_size == 4
    assert tok.encode("a b <|endoftext|>") != tok.encode("a b")  # text specials are not parsed
    assert 3 not in tok.encode("a b <|endoftext|>")

    bare = HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(UserError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "bare.json"))


def test_build_tokenizer_bpe_trains_once_then_uses_the_cache(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    cfg = make_cfg([str(tmp_path / "docs.jsonl")]).data
    cfg.tokenizer, cfg.tokenizer_vocab_size = "bpe", 300
    first = build_tokenizer(cfg, tmp_path / "cache")
    files = list((tmp_path / "cache").rglob("tokenizer.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = build_tokenizer(cfg, tmp_path / "cache")
    assert second.hash == first.hash and files[0].stat().st_mtime_ns == stamp
    cfg.tokenizer_vocab_size = 320  # another vocab size is another cache entry
    assert build_tokenizer(cfg, tmp_path / "cache").vocab_size == 320
    assert len(list((tmp_path / "cache").rglob("tokenizer.json"))) == 2
    cfg.tokenizer = "byte"
    assert build_tokenizer(cfg, tmp_path / "cache").vocab_size == 259


@pytest.mark.parametrize(
    "name, message",
    [
        ("meta-llama/Llama-3.2-1B", "offline"),
        ("missing/dir/tokenizer.json", "not 'byte', 'bpe', an existing"),
        ("no_such_thing", "not 'byte', 'bpe', an existing"),
    ],
)
def test_bad_tokenizer_names_give_one_line(name, message):
    with pytest.raises(UserError, match=message) as err:
        load_tokenizer(name)
    assert "\n" not in str(err.value)


def test_invalid_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_check_vocab():
    tok = Tokenizer.byte()
    check_vocab(259, tok)
    check_vocab(512, tok)
    with pytest.raises(UserError, match="model.vocab_size=258 is smaller"):
        check_vocab(258, tok)


def main(argv: list[str]) -> int:
    """`tokenmill tokenizer ...` as cli.main runs it (one error line, exit code 2), without the other commands."""
    parser = argparse.ArgumentParser()
    tokenizer_cli.add_arguments(parser)
    try:
        return tokenizer_cli.run(parser.parse_args(argv[1:]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def test_cli_trains_and_refuses_to_overwrite(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", make_docs(200), field="content")
    out = tmp_path / "tok"
    args = [
        "tokenizer",
        "train",
        "--source",
        str(tmp_path / "docs.jsonl"),
        "--text-field",
        "content",
        "--vocab-size",
        "300",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    saved = json.loads((out / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) + len(saved["added_tokens"]) >= 300
    tok = Tokenizer.from_file(out)
    assert tok.hash in capsys.readouterr().out
    before = (out / "tokenizer.json").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--source",
                str(tmp_path / "nope.jsonl"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err

"""Shard format reader and shard loader: exactly-once sharding, doc_ids, exact resume, reshaped resume, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenmill.data import shard_loader
from tokenmill.data.shards import (
    build_shard_loader,
    new_manifest,
    open_shards,
    token_dtype,
    write_manifest,
    write_shard,
)
from tokenmill.errors import UserError

TOK = SimpleNamespace(hash="test-tokenizer", vocab_size=60000, eos_id=0)


def make_shards(folder, shard_tokens=(700, 500, 333), doc_len=23, split="train"):
    """A prepared folder whose token at global offset p is p itself: a window is named by its first token.

    Documents are `doc_len` tokens long (the last one of a shard shorter), so doc_ids are easy to predict.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(TOK, "test", {"source": "synthetic"})
    offset = 0
    for i, n in enumerate(shard_tokens):
        tokens = np.arange(offset, offset + n, dtype=np.uint16)
        starts = np.arange(0, n, doc_len, dtype=np.int64)
        entry = write_shard(folder, f"{split}-{i:05d}", tokens, starts)
        info = manifest["splits"][split]
        info["shards"].append(entry)
        info["tokens"] += entry["tokens"]
        info["docs"] += entry["docs"]
        offset += n
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return folder


def window_starts(shard_tokens, window):
    starts, offset = [], 0
    for n in shard_tokens:
        starts += [offset + w * window for w in range(n // window)]
        offset += n
    return starts


def loader(folder, rank=0, world=1, workers=0, batch=2, seq_len=9, seed=3, shuffle=1):
    return build_shard_loader(folder, TOK, "train", batch, seq_len, rank, world, workers, seed, shuffle)


def take(it, n):
    return [next(it) for _ in range(n)]


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_token_dtype_boundary():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(128256) == np.uint32


def test_batches_shape_dtype_and_doc_ids(tmp_path):
    folder = make_shards(tmp_path / "d")
    ld = loader(folder, batch=4, seq_len=31)
    batch = next(iter(ld))
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == torch.long
    assert batch["doc_ids"].shape == (4, 32) and batch["doc_ids"].dtype == torch.long
    reader = ld.dataset.reader
    tokens, doc_ids = reader.read(np.arange(reader.n_windows))  # every window, shard starts included
    shard_ends = np.cumsum([0, 700, 500, 333])
    for row, ids in zip(tokens.tolist(), doc_ids.tolist()):
        assert row == list(range(row[0], row[0] + 32))  # a contiguous slice of one shard
        k = int(np.searchsorted(shard_ends, row[0], side="right") - 1)
        local = np.array(row) - shard_ends[k]
        expected = local // 23 - local[0] // 23  # document of each position, counted from the row's first
        assert ids == expected.tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_over_an_epoch_two_ranks(tmp_path, workers):
    sizes = (700, 500, 333)
    folder = make_shards(tmp_path / "d", sizes)
    window = 10
    all_windows = window_starts(sizes, window)  # 70 + 50 + 33 = 153 windows
    readers = 2 * max(workers, 1)
    per_reader = len(all_windows) // readers
    batch = 1 if per_reader % 2 else 2
    seen = []
    for rank in range(2):
        it = iter(loader(folder, rank=rank, world=2, workers=workers, batch=batch, seq_len=window - 1))
        for b in take(it, per_reader * max(workers, 1) // batch):
            seen += b["tokens"][:, 0].tolist()
    assert len(seen) == len(set(seen)) == readers * per_reader  # no window twice
    assert set(seen) <= set(all_windows)
    assert len(set(all_windows) - set(seen)) == len(all_windows) % readers  # only the < readers remainder is left


def test_epochs_reshuffle_and_cycle(tmp_path):
    folder = make_shards(tmp_path / "d", (400,))
    it = iter(loader(folder, batch=1, seq_len=9))  # 40 windows per epoch
    first = [b["tokens"][0, 0].item() for b in take(it, 40)]
    second = [b["tokens"][0, 0].item() for b in take(it, 40)]
    assert sorted(first) == sorted(second) == list(range(0, 400, 10))
    assert first != second


@pytest.mark.parametrize("workers,k", [(0, 3), (2, 3), (2, 24), (0, 41)])
def test_resume_is_exact(tmp_path, workers, k):
    """k batches, state through torch.save/load(weights_only), fresh loader: next m batches identical.

    k=24 with 2 workers and k=41 cross the epoch end (1533 tokens / 10 = 153 windows, 2 per batch)."""
    folder = make_shards(tmp_path / "d")
    m = 60
    reference = take(iter(loader(folder, workers=workers)), k + m)
    first = loader(folder, workers=workers)
    take(iter(first), k)
    state = roundtrip(first.state_dict())
    first.close()
    resumed = loader(folder, workers=workers)
    resumed.load_state_dict(state)
    got = take(iter(resumed), m)
    for a, b in zip(reference[k:], got):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["doc_ids"], b["doc_ids"])


def test_resume_twice_in_a_row(tmp_path):
    folder = make_shards(tmp_path / "d")
    reference = take(iter(loader(folder, workers=2)), 90)
    got, state = [], None
    for part in (17, 40, 33):  # the third loader resumes from a state that was itself resumed
        ld = loader(folder, workers=2)
        if state is not None:
            ld.load_state_dict(state)
        got += take(iter(ld), part)
        state = roundtrip(ld.state_dict())
        ld.close()
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(reference, got))


@pytest.mark.parametrize("before,after", [((2, 1), (3, 1)), ((2, 2), (1, 1)), ((1, 0), (2, 2))])
def test_resume_with_another_layout_repeats_nothing(tmp_path, before, after):
    """(world, workers) changes: windows read after the resume are all new within the epoch."""
    folder = make_shards(tmp_path / "d", (3000,))  # 300 windows of 10
    world, workers = before
    read, states = [], []
    for rank in range(world):
        ld = loader(folder, rank=rank, world=world, workers=workers, batch=2)
        read += [w for b in take(iter(ld), 11) for w in b["tokens"][:, 0].tolist()]  # odd: workers differ
        states.append(roundtrip(ld.state_dict()))
        ld.close()
    world, workers = after
    later = []
    for rank in range(world):
        ld = loader(folder, rank=rank, world=world, workers=workers, batch=2)
        with pytest.warns(UserWarning, match="different layout"):
            ld.load_state_dict(states[0])  # any rank's state: ranks consume in lockstep
        later += [w for b in take(iter(ld), 8) for w in b["tokens"][:, 0].tolist()]
        ld.close()
    assert len(later) == len(set(later))
    assert not set(read) & set(later)


def test_reading_leaves_no_token_file_mapped(tmp_path, monkeypatch):
    """Resident memory stays flat: token files are read, never mapped; index maps are dropped periodically."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    folder = make_shards(tmp_path / "d", (3000,))
    monkeypatch.setattr(shard_loader, "REMAP_WINDOWS", 4)  # 2 batches of 2 windows
    ld = loader(folder)
    it = iter(ld)
    index_mapped = []
    for _ in range(6):
        next(it)
        mapped = maps.read_text()
        assert "train-00000.bin" not in mapped
        index_mapped.append("train-00000.idx.npy" in mapped)
    assert index_mapped == [True, False, True, False, True, False]


def test_eval_loader_restarts_each_iter(tmp_path):
    from data_helpers import make_cfg
    from tokenmill.data.loader import build_loader

    folder = make_shards(tmp_path / "d", (300,), split="eval")
    ld = build_loader(make_cfg([str(folder)], seq_len=9, batch=2, eval_fraction=0.02), TOK, "eval")
    a = list(ld)
    b = list(ld)
    assert len(a) == 15 and all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))  # 30 windows, once
    assert [row[0] for batch in a for row in batch["tokens"].tolist()] == list(range(0, 300, 10))  # in file order


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="shard folder not found"):
        open_shards(tmp_path / "nope", "train")


def test_other_tokenizer_refused(tmp_path):
    folder = make_shards(tmp_path / "d")
    other = SimpleNamespace(hash="another-hash", vocab_size=60000, eos_id=0, name="other")
    with pytest.raises(UserError) as err:
        open_shards(folder, "train", other)
    message = str(err.value)
    assert "test-tokenizer" in message and "another-hash" in message and "prepare" in message
    assert "\n" not in message


def test_truncated_and_corrupt_shards(tmp_path):
    folder = make_shards(tmp_path / "d")
    victim = folder / "train-00001.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[:-2])
    with pytest.raises(UserError, match="checksum error: .*train-00001.bin"):
        open_shards(folder, "train", TOK)
    victim.write_bytes(data[:-2] + b"\x00\x00" if data[-2:] != b"\x00\x00" else data[:-2] + b"\x01\x00")
    open_shards(folder, "train", TOK)  # same size: the cheap check passes ...
    with pytest.raises(UserError, match="checksum error: .*train-00001.bin"):
        open_shards(folder, "train", TOK, verify="full")  # ... the full one does not


def test_state_from_other_data_or_seq_len_refused(tmp_path):
    a = loader(make_shards(tmp_path / "a"))
    take(iter(a), 2)
    state = roundtrip(a.state_dict())
    with pytest.raises(UserError, match=r"seq_len changed \(9 -> 19\)"):
        loader(tmp_path / "a", seq_len=19).load_state_dict(state)
    other = loader(make_shards(tmp_path / "b", (700, 500, 334)))  # same window count, other content
    with pytest.raises(UserError, match="dataset"):
        other.load_state_dict(state)


def test_unfinished_folder_and_too_few_windows(tmp_path):
    folder = make_shards(tmp_path / "d", (50,))
    with pytest.raises(UserError, match="fewer than the 4 readers"):
        loader(folder, world=4, seq_len=19)  # 2 windows for 4 ranks
    manifest = open_shards(folder, "train").manifest
    manifest["complete"] = False
    write_manifest(folder, manifest)
    with pytest.raises(UserError, match="unfinished prepare"):
        open_shards(folder, "train")


A_SHARD_WITHOUT_INDEX = {
    "format": "tokenmill-shards",
    "version": 1,
    "complete": True,
    "tokenizer": {"hash": "h", "vocab_size": 9, "eos_id": 0, "spec": "byte"},
    "dtype": "uint16",
    "settings": {},
    "chunks": [],
    "splits": {
        "train": {"tokens": 1, "docs": 1, "shards": [{"file": "../x.bin"}]},
        "eval": {"tokens": 0, "docs": 0, "shards": []},
    },
    "source_docs": 1,
    "source_bytes": 1,
}


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[1, 2]", "holds a JSON list"),
        ('{"format": "tokenmill-shards", "version": 1}', "'complete' is missing"),
        (json.dumps(A_SHARD_WITHOUT_INDEX), "'index' is missing"),
        ('{"format": "other", "version": 3}', "format other v3"),
    ],
)
def test_malformed_manifest_is_one_line(tmp_path, content, problem):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=problem) as err:
        open_shards(tmp_path, "train")
    assert "\n" not in str(err.value) and "prepare" in str(err.value)


def test_shard_overwritten_in_place_is_caught_when_read(tmp_path):
    folder = make_shards(tmp_path / "d", (700, 500, 333))
    small = SimpleNamespace(hash="test-tokenizer", vocab_size=1200, eos_id=0)  # ids >= 1200 are impossible ...
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 1200
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ld = build_shard_loader(folder, small, "train", 2, 9, shuffle_buffer=0)
    take(iter(ld), 60)  # ... and the first 1200 tokens (shards 0 and 1) hold none
    with pytest.raises(UserError, match=r"train-00002.bin is damaged: it holds token id 12\d\d, outside") as err:
        take(iter(ld), 20)  # shard 2 holds ids 1200-1532: the read catches what the cheap size check cannot
    assert "\n" not in str(err.value)
    index = folder / "train-00000.idx.npy"
    starts = np.load(index)
    np.save(index, starts[::-1].copy())  # same size, not sorted any more
    with pytest.raises(UserError, match="train-00000.idx.npy is not this shard's document index"):
        take(iter(build_shard_loader(folder, small, "train", 2, 9, shuffle_buffer=0)), 3)


def test_shard_state_follows_the_loader_conventions(tmp_path):
    folder = make_shards(tmp_path / "d", (3000,))
    ld = loader(folder, world=2)
    take(iter(ld), 3)
    state = roundtrip(ld.state_dict())
    assert state["format"] == 2 and state["kind"] == "shards" and {"identity", "layout"} <= set(state)
    with pytest.warns(UserWarning, match="different layout .*world_size 2->1.*no document is repeated"):
        loader(folder, world=1).load_state_dict(state)
    with pytest.raises(UserError, match="format 1"):
        loader(folder, world=2).load_state_dict({**state, "format": 1})
    with pytest.raises(UserError, match="holds a 'text' loader state"):
        loader(folder, world=2).load_state_dict({**state, "kind": "text"})

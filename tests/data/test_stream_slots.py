"""Streaming sources with many units (parquet row groups, files): whole units per (rank, worker) slot, every byte
read once, exact resume, and a resume on another layout that reads nothing twice."""

from __future__ import annotations

import io

import pytest
import torch

from data_helpers import doc_tags, make_cfg, make_docs, write_parquet
from tokenmill.data.loader import build_loader
from tokenmill.data.streams import assign_units, merge_stream_positions
from tokenmill.data.tokenizer import Tokenizer

TOK = Tokenizer.byte()
FILES = 12


@pytest.fixture()
def twelve_files(tmp_path):
    docs = []
    for i in range(FILES):
        part = make_docs(25, "abcdefghijkl"[i] + "x", seed=i, max_words=16)
        write_parquet(tmp_path / f"part{i:02d}.parquet", part, row_group_size=10)
        docs += part
    return str(tmp_path / "part*.parquet"), docs


def cfg_for(glob, **kw):
    return make_cfg([glob], seq_len=31, batch=2, shuffle=kw.pop("shuffle", 0), stream=True, document_buffer=4, **kw)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_units_are_assigned_whole_when_there_are_enough():
    assert assign_units(list(range(12)), 1, 4) == ([1, 5, 9], 1, 0)  # unit mode: every document of 3 units
    assert assign_units([0, 1, 2], 1, 4) == ([0, 1, 2], 4, 1)  # fewer units than slots: every 4th document


def test_two_ranks_two_workers_read_disjoint_row_groups_each_byte_once(twelve_files):
    glob, docs = twelve_files
    cfg = cfg_for(glob, workers=2)
    windows, sources = [], []
    for rank in range(2):
        loader = build_loader(cfg, TOK, "train", rank, 2, epochs=1)
        windows += [tuple(r) for b in loader for r in b["tokens"].tolist()]
        sources.append(loader.stats()["sources"][glob])
    assert len(windows) == len(set(windows))  # no window twice
    read = sum(s["read"] for s in sources)
    scanned = sum(s["scanned"] for s in sources)
    assert read == scanned == len(docs)  # every document read once, by one slot, and no slot skipped any
    assert sum(s["scanned_bytes"] for s in sources) == sum(len(d.encode()) for d in docs)  # 1.0x the bytes
    stream_tokens = sum(len(d.encode()) + 1 for d in docs)
    assert stream_tokens - 4 * 31 <= 32 * len(windows) <= stream_tokens  # all but each slot's cut-off tail


def test_fewer_units_than_slots_fall_back_to_every_slot_reading_everything(tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(2):  # 2 files of one row group each: 2 units for 4 slots
        write_parquet(few / f"part{i:02d}.parquet", make_docs(25, "ab"[i] + "x", seed=i), row_group_size=100)
    cfg = cfg_for(str(few), workers=2)
    scanned, read = 0, 0
    for rank in range(2):  # 2 files for 4 slots: each slot keeps every 4th document of the whole stream
        loader = build_loader(cfg, TOK, "train", rank, 2, epochs=1)
        list(loader)
        counts = loader.stats()["sources"][str(few)]
        scanned, read = scanned + counts["scanned"], read + counts["read"]
    assert read == 50 and scanned == 4 * 50


def test_resume_is_exact_on_a_rank_of_two(twelve_files):
    glob, _ = twelve_files
    cfg = cfg_for(glob, workers=2, shuffle=4)
    k, m = 17, 12  # each worker is mid-file, with documents and windows in its buffers
    reference = build_loader(cfg, TOK, "train", 1, 2)
    ref = [b for _, b in zip(range(k + m), reference)]
    first = build_loader(cfg, TOK, "train", 1, 2)
    assert len([b for _, b in zip(range(k), first)]) == k
    state = roundtrip(first.state_dict())
    resumed = build_loader(cfg, TOK, "train", 1, 2)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(m), resumed)]
    assert len(got) == m and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(ref[k:], got))
    for loader in (reference, first, resumed):
        loader.close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("new_workers", [0, 3])
def test_resume_on_another_layout_reads_nothing_twice_in_the_epoch(tmp_path, new_workers):
    # More documents per slot than one tokenization chunk (512), so the old slots stop inside the epoch.
    docs = []
    for i in range(FILES):
        part = make_docs(150, "abcdefghijkl"[i] + "x", seed=i, max_words=6)
        write_parquet(tmp_path / f"part{i:02d}.parquet", part, row_group_size=50)
        docs += part
    glob = str(tmp_path / "part*.parquet")
    loader = build_loader(cfg_for(glob, workers=2), TOK, "train", epochs=1)
    it = iter(loader)
    before = [r for _ in range(12) for r in next(it)["tokens"].tolist()]
    state = roundtrip(loader.state_dict())
    loader.close()
    resumed = build_loader(cfg_for(glob, workers=new_workers), TOK, "train", epochs=1)
    with pytest.warns(UserWarning, match="no document is repeated"):
        resumed.load_state_dict(state)
    after = [r for b in resumed for r in b["tokens"].tolist()]
    tags_before = {t for r in before for t in doc_tags(TOK.decode(r))}
    tags_after = {t for r in after for t in doc_tags(TOK.decode(r))}
    assert tags_before and tags_after and not tags_before & tags_after  # no document twice in the epoch
    assert len(tags_after) > len(docs) // 4  # and the unread files of the epoch were not thrown away


def test_merge_finishes_passed_units_and_continues_partly_read_ones():
    a = {"index": 9, "unit": 1, "doc": 4, "ds": {"at": "a"}, "mine": [0, 2, 4], "n_units": 6, "plan": None}
    b = {"index": 3, "unit": 0, "doc": 3, "ds": None, "mine": [1, 3, 5], "n_units": 6, "plan": None}
    merged = merge_stream_positions([a, b])
    assert merged["plan"] == {
        "units": [1, 2, 3, 4, 5],
        "starts": {"2": {"doc": 4, "ds": {"at": "a"}}, "1": {"doc": 3, "ds": None}},
    }
    again = merge_stream_positions(
        [
            {**merged, "mine": [1, 3], "unit": 1, "doc": 0, "ds": None},
            {**merged, "mine": [2, 4, 5], "unit": 0, "doc": 6, "ds": {"at": "c"}},
        ]
    )
    assert again["plan"]["units"] == [2, 3, 4, 5]  # unit 1 finished; 0 stays finished from the first plan
    assert again["plan"]["starts"] == {"2": {"doc": 6, "ds": {"at": "c"}}}

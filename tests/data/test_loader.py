"""Loader: exactly-once over ranks x workers, exact resume (workers, epochs, twice), splits, layouts, errors."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from data_helpers import doc_tags, make_cfg, make_docs, write_jsonl, write_parquet
from tokenmill.data import loader as loader_module
from tokenmill.data.loader import build_loader
from tokenmill.data.mixture import is_eval_doc
from tokenmill.data.packing import doc_ids_of
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

TOK = Tokenizer.byte()


def take(it, n):
    return [next(it) for _ in range(n)]


def roundtrip(state):
    """Through the real checkpoint format: torch.save, then a weights_only load (no pickled code)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["doc_ids"], b["doc_ids"])


def packed_windows(docs, window):
    stream = []
    for d in docs:
        stream += list(d.encode()) + [TOK.eos_id]
    n = len(stream) // window
    return [tuple(stream[i * window : (i + 1) * window]) for i in range(n)]


@pytest.mark.parametrize("stream", [False, True])
def test_exactly_once_over_two_ranks_and_two_workers(tmp_path, stream):
    docs = make_docs(240, max_words=30)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = make_cfg(
        [str(path)],
        seq_len=31,
        batch=3,
        shuffle=8,
        workers=2,
        eval_fraction=0.1,
        shuffle_documents=False,
        stream=stream,
    )
    got = []
    for rank in range(2):
        for batch in build_loader(cfg, TOK, "train", rank, 2, epochs=1):
            assert batch["tokens"].shape[1] == 32 and batch["tokens"].dtype == torch.int64
            assert torch.equal(batch["doc_ids"], doc_ids_of(batch["tokens"], TOK.eos_id))
            got += [tuple(row) for row in batch["tokens"].tolist()]
    # Slot s = rank * 2 + worker packs the train documents with index % 4 == s; each slot drops its own
    # tail of < seq_len + 1 tokens at the end of a finite run.
    expected = []
    for slot in range(4):
        mine = [d for i, d in enumerate(docs) if i % 4 == slot and not is_eval_doc(d, 0.1)]
        expected += packed_windows(mine, 32)
    counts = Counter(got)
    assert max(counts.values()) == 1  # no duplicate window
    assert counts == Counter(expected)  # and none missing
    stream_tokens = sum(len(d.encode()) + 1 for d in docs if not is_eval_doc(d, 0.1))
    assert stream_tokens - 4 * 31 <= 32 * len(got) <= stream_tokens  # only the 4 slot tails are left out


def source_paths(tmp_path, kind):
    docs = make_docs(30, max_words=14)
    if kind in ("jsonl", "stream-jsonl"):
        return [str(write_jsonl(tmp_path / "d.jsonl", docs))]
    if kind == "parquet":
        return [str(write_parquet(tmp_path / "d.parquet", docs, row_group_size=7))]
    if kind == "stream-files":
        for i in range(3):
            write_parquet(tmp_path / f"part{i}.parquet", make_docs(12, f"p{i}x", max_words=14), row_group_size=5)
        return [str(tmp_path / "*.parquet")]
    return [
        str(write_jsonl(tmp_path / "a.jsonl", make_docs(30, "a", max_words=14))) + ":0.5",
        str(write_parquet(tmp_path / "b.parquet", make_docs(20, "b", max_words=14))) + ":0.3",
        "stdlib:0.2",
    ]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "mixture", "stream-jsonl", "stream-files"])
def test_resume_is_exact_across_epochs_and_twice(tmp_path, monkeypatch, kind, workers):
    # Workers snapshot their state every SNAPSHOT_EVERY batches and a resume replays the batches since; a small
    # interval makes the resume go through a restored worker state *and* a replay. Streamed sources pass their
    # documents through a document buffer (file mode with 3 files, document mode with one).
    monkeypatch.setattr(loader_module, "SNAPSHOT_EVERY", 3)
    cfg = make_cfg(
        source_paths(tmp_path, kind),
        seq_len=31,
        batch=4,
        shuffle=8,
        workers=workers,
        stream=kind.startswith("stream"),
        document_buffer=6,
    )
    k, m1, m2 = 9, 8, 9
    reference = build_loader(cfg, TOK, "train")
    ref = take(iter(reference), k + m1 + m2)
    assert max(c["epoch"] for c in reference.state_dict()["cursor"]) >= 1  # the run crossed an epoch boundary

    first = build_loader(cfg, TOK, "train")
    it = iter(first)
    assert_same(take(it, k), ref[:k])
    state = roundtrip(first.state_dict())
    assert_same(take(it, 2), ref[k : k + 2])  # saving does not disturb the running loader

    second = build_loader(cfg, TOK, "train")
    second.load_state_dict(state)
    it2 = iter(second)
    assert_same(take(it2, m1), ref[k : k + m1])
    state2 = roundtrip(second.state_dict())

    third = build_loader(cfg, TOK, "train")
    third.load_state_dict(state2)
    assert_same(take(iter(third), m2), ref[k + m1 :])


def test_iterating_again_continues_the_train_stream(tmp_path):
    cfg = make_cfg(source_paths(tmp_path, "jsonl"))
    ref = take(iter(build_loader(cfg, TOK, "train")), 6)
    loader = build_loader(cfg, TOK, "train")
    got = take(iter(loader), 3) + take(iter(loader), 3)
    assert_same(got, ref)


def test_eval_split_is_disjoint_from_train(tmp_path):
    docs = make_docs(300, max_words=20)
    cfg = make_cfg([str(write_jsonl(tmp_path / "d.jsonl", docs))], seq_len=63, batch=2, eval_fraction=0.2)
    train = [w for b in build_loader(cfg, TOK, "train", epochs=1) for w in b["tokens"].tolist()]
    evals = [w for b in build_loader(cfg, TOK, "eval", epochs=1) for w in b["tokens"].tolist()]
    train_tags = set().union(*(doc_tags(TOK.decode(w)) for w in train))
    eval_tags = set().union(*(doc_tags(TOK.decode(w)) for w in evals))
    assert eval_tags and train_tags and not train_tags & eval_tags
    assert 0.1 < len(eval_tags) / len(train_tags | eval_tags) < 0.3


def test_eval_restarts_each_time_and_can_be_bos_aligned(tmp_path):
    docs = make_docs(200, max_words=20)
    cfg = make_cfg(
        [str(write_jsonl(tmp_path / "d.jsonl", docs))], seq_len=47, batch=2, eval_fraction=0.3, bos_aligned_eval=True
    )
    loader = build_loader(cfg, TOK, "eval")
    first = take(iter(loader), 3)
    assert_same(take(iter(loader), 3), first)  # every evaluation sees the same batches
    for batch in first:
        assert bool((batch["tokens"][:, 0] == TOK.bos_id).all())
        assert TOK.pad_id not in batch["tokens"]
    with pytest.raises(UserError, match="there is no eval set") as err:
        build_loader(make_cfg(cfg.data.sources, eval_fraction=0.0), TOK, "eval")
    assert "data.eval_sources" in str(err.value) and "\n" not in str(err.value)


def consumed_tags(batches):
    return set().union(*(doc_tags(TOK.decode(row)) for b in batches for row in b["tokens"].tolist()))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("new_world, new_workers", [(1, 2), (2, 0)])
def test_resume_on_another_layout_repeats_no_document(tmp_path, new_world, new_workers, stream):
    # More documents than one tokenization chunk (512), so both runs stay in the first epoch: "no repeat" is per epoch.
    if stream:  # 6 files: file mode before (1 slot), file or document mode after (2 slots)
        for i in range(6):
            write_jsonl(tmp_path / f"part{i}.jsonl", make_docs(200, "abcdef"[i] + "x", seed=i, max_words=20))
        sources = [str(tmp_path / "part*.jsonl")]
    else:
        sources = [str(write_jsonl(tmp_path / "d.jsonl", make_docs(1500, max_words=20)))]
    cfg = make_cfg(sources, seq_len=31, batch=4, shuffle=16, stream=stream, document_buffer=8)
    loader = build_loader(cfg, TOK, "train")
    before = consumed_tags(take(iter(loader), 20))
    state = roundtrip(loader.state_dict())

    new_cfg = make_cfg(sources, seq_len=31, batch=4, shuffle=16, workers=new_workers, stream=stream, document_buffer=8)
    after = set()
    for rank in range(new_world):
        resumed = build_loader(new_cfg, TOK, "train", rank, new_world)
        with pytest.warns(UserWarning, match="no document is repeated"):
            resumed.load_state_dict(state)
        after |= consumed_tags(take(iter(resumed), 15))
    assert before and after
    assert not before & after


def test_resume_on_another_layout_continues_past_the_cursor(tmp_path):
    docs = make_docs(400, max_words=20)
    path = str(write_jsonl(tmp_path / "d.jsonl", docs))
    cfg = make_cfg([path], seq_len=31, batch=4, shuffle=16, shuffle_documents=False)
    loader = build_loader(cfg, TOK, "train")
    before = consumed_tags(take(iter(loader), 20))
    state = roundtrip(loader.state_dict())
    resumed = build_loader(
        make_cfg([path], seq_len=31, batch=4, shuffle=16, workers=2, shuffle_documents=False), TOK, "train"
    )
    with pytest.warns(UserWarning, match="no document is repeated"):
        resumed.load_state_dict(state)
    after = consumed_tags(take(iter(resumed), 15))
    assert min(int(t[1:]) for t in after) > max(int(t[1:]) for t in before)  # in document order: past them all


def test_uneven_ranks_never_run_dry(tmp_path):
    docs = ["x" * 3000, "a", "b", "c", "d"]  # rank 0 gets two long documents, rank 1 two one-letter ones
    cfg = make_cfg([str(write_jsonl(tmp_path / "u.jsonl", docs))], seq_len=15, batch=2, shuffle=0)
    for rank in range(2):
        batches = take(iter(build_loader(cfg, TOK, "train", rank, 2)), 40)  # cycles epochs, never stops
        assert len(batches) == 40
    assert build_loader(cfg, TOK, "train", 1, 2).state_dict()["cursor"] is None


def test_a_slot_without_documents_fails_with_one_line(tmp_path):
    cfg = make_cfg([str(write_jsonl(tmp_path / "tiny.jsonl", make_docs(3)))], workers=2)
    loader = build_loader(cfg, TOK, "train", 1, 2)  # slots 2 and 3 of 4; slot 3 has no document
    with pytest.raises(UserError, match="no train documents for slot 3 of 4") as err:
        take(iter(loader), 50)
    assert "\n" not in str(err.value)


def test_changed_data_settings_refuse_the_state(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", make_docs(50)))
    loader = build_loader(make_cfg([path]), TOK, "train")
    take(iter(loader), 2)
    state = loader.state_dict()
    with pytest.raises(UserError, match="seed changed"):
        build_loader(make_cfg([path], seed=99), TOK, "train").load_state_dict(state)


def test_shards_folder_is_delegated(tmp_path, monkeypatch):
    import tokenmill.data.shards as shards

    (tmp_path / "manifest.json").write_text("{}")
    calls = []
    monkeypatch.setattr(shards, "build_shard_loader", lambda *args: calls.append(args) or "shard-loader", raising=False)
    cfg = make_cfg([str(tmp_path)], seq_len=16, batch=2, shuffle=5, workers=1)
    assert build_loader(cfg, TOK, "train", 1, 2) == "shard-loader"
    assert calls == [(str(tmp_path), TOK, "train", 2, 16, 1, 2, 1, cfg.train.seed, 5)]
    with pytest.raises(UserError, match="only data.sources entry"):
        build_loader(make_cfg([str(tmp_path), "stdlib"]), TOK, "train")


def _two_rank_state(path: str) -> tuple[set, dict]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = make_cfg([path], seq_len=31, batch=2, shuffle=0, shuffle_documents=False)
    loader = build_loader(cfg, TOK, "train", rank, 2)
    seen = consumed_tags(take(iter(loader), 6))
    return seen, roundtrip(loader.state_dict())  # state_dict() gathers the cursor over both ranks


def test_cursor_is_gathered_over_ranks(tmp_path):
    from dist_helpers import run_ranks

    # Rank 0's first document is longer than a tokenization chunk: it stops at index 1. Rank 1 reads short
    # documents and has tokenized 512 of them (indices up to ~1024) when it emitted its first ~40. Only a cursor
    # gathered from both ranks lets a resume from rank 0's state skip what rank 1 emitted.
    docs = ["<l00000> " + "x" * 300_000] + [f"<s{i:05d}>" for i in range(1, 1200)]
    path = str(write_jsonl(tmp_path / "d.jsonl", docs))
    (seen0, state0), (seen1, _) = run_ranks(_two_rank_state, 2, path, timeout=180)
    assert seen1 and max(int(t[1:]) for t in seen1) > 1
    resumed = build_loader(make_cfg([path], seq_len=31, batch=2, shuffle=0, shuffle_documents=False), TOK, "train")
    with pytest.warns(UserWarning, match="no document is repeated"):
        resumed.load_state_dict(state0)
    after = consumed_tags(take(iter(resumed), 5))
    assert after and not after & (seen0 | seen1)


# ---------------------------------------------------------------------------------------------------
# Document shuffling


def documents_in_order(batches):
    """The complete documents of an unshuffled-window stream, in order (the cut-off last one is dropped)."""
    stream = [t for b in batches for row in b["tokens"].tolist() for t in row]
    docs, current = [], []
    for t in stream:
        if t == TOK.eos_id:
            docs.append(TOK.decode(current))
            current = []
        else:
            current.append(t)
    return docs


@pytest.mark.parametrize("stream", [False, True])
def test_sorted_single_file_is_read_in_a_new_order_per_epoch_and_seed(tmp_path, stream):
    docs = make_docs(120, max_words=8)  # sorted by their tags, as a file sorted by topic would be
    path = str(write_jsonl(tmp_path / "sorted.jsonl", docs))

    def epochs(seed):
        cfg = make_cfg([path], seq_len=63, batch=4, shuffle=0, seed=seed, stream=stream, document_buffer=16)
        got = documents_in_order(build_loader(cfg, TOK, "train", epochs=2))
        return got[:120], got[120:]

    first, second = epochs(seed=1)
    assert sorted(first) == docs  # every document exactly once in the epoch
    assert first != docs  # not file order
    assert second != first[: len(second)] and len(second) > 100  # epoch 2 has its own order
    assert len(set(second)) == len(second) and set(second) <= set(docs)
    assert epochs(seed=2)[0] != first  # and another seed another one
    unshuffled = make_cfg([path], seq_len=63, batch=4, shuffle=0, shuffle_documents=False, stream=stream)
    in_file_order = documents_in_order(build_loader(unshuffled, TOK, "train", epochs=1))
    assert in_file_order == docs[: len(in_file_order)] and len(in_file_order) >= 118  # the switch turns it off


@pytest.mark.parametrize("stream", [False, True])
def test_shuffled_documents_cover_every_document_once_over_slots(tmp_path, stream):
    for i in range(2):
        write_jsonl(tmp_path / f"part{i}.jsonl", make_docs(100, f"f{i}x", seed=i, max_words=12))
    cfg = make_cfg([str(tmp_path / "part*.jsonl")], seq_len=31, batch=2, shuffle=0, stream=stream, document_buffer=8)
    docs = make_docs(100, "f0x", seed=0, max_words=12) + make_docs(100, "f1x", seed=1, max_words=12)
    found = []
    for rank in range(4):  # 4 slots, 2 files: document mode for a stream
        found += documents_in_order(build_loader(cfg, TOK, "train", rank, 4, epochs=1))
    assert len(found) == len(set(found))  # no document twice
    assert set(found) <= set(docs)
    missing = set(docs) - set(found)
    assert len(missing) <= 4 * 2  # only documents ending in a slot's cut-off tail (< 32 tokens; >= 17 per doc)


def test_every_loader_follows_one_contract(tmp_path):
    from tokenmill.data.loader import BatchLoader
    from tokenmill.data.prepare import prepare_documents

    docs = make_docs(200, max_words=20)
    text = str(write_jsonl(tmp_path / "d.jsonl", docs))
    prepare_documents(docs, TOK, tmp_path / "shards", tokenizer_spec="byte", source="d", eval_fraction=0.2)
    loaders = {
        "text": build_loader(make_cfg([text]), TOK, "train"),
        "shards": build_loader(make_cfg([str(tmp_path / "shards")]), TOK, "train"),
        "eval": build_loader(make_cfg([text], eval_fraction=0.2), TOK, "eval"),
    }
    for kind, loader in loaders.items():
        assert isinstance(loader, BatchLoader)
        batch = next(iter(loader))
        assert batch["tokens"].shape == batch["doc_ids"].shape == (4, 33)
        state = roundtrip(loader.state_dict())
        assert state["format"] == 2 and state["kind"] == kind and {"identity", "layout"} <= set(state)
        stats = loader.stats()
        assert stats["batches"] >= 1 and isinstance(stats["sources"], dict)
        loader.load_state_dict(state)
        other = next(k for k in loaders if k != kind)
        with pytest.raises(UserError, match=f"holds a {other!r} loader state"):
            loader.load_state_dict({**state, "kind": other})
        loader.close()

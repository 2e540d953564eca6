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
    return [tuple(stream[i * window:(i + 1) * window]) for i in range(n)]


def test_exactly_once_over_two_ranks_and_two_workers(tmp_path):
    docs = make_docs(240, max_words=30)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = make_cfg([str(path)], seq_len=31, batch=3, shuffle=8, workers=2, eval_fraction=0.1)
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
    if kind == "jsonl":
        return [str(write_jsonl(tmp_path / "d.jsonl", docs))]
    if kind == "parquet":
        return [str(write_parquet(tmp_path / "d.parquet", docs, row_group_size=7))]
    return [str(write_jsonl(tmp_path / "a.jsonl", make_docs(30, "a", max_words=14))) + ":0.5",
            str(write_parquet(tmp_path / "b.parquet", make_docs(20, "b", max_words=14))) + ":0.3",
            "stdlib:0.2"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "mixture"])
def test_resume_is_exact_across_epochs_and_twice(tmp_path, monkeypatch, kind, workers):
    # Workers snapshot their state every SNAPSHOT_EVERY batches and a resume replays the batches since; a small
    # interval makes the resume go through a restored worker state *and* a replay.
    monkeypatch.setattr(loader_module, "SNAPSHOT_EVERY", 3)
    cfg = make_cfg(source_paths(tmp_path, kind), seq_len=31, batch=4, shuffle=8, workers=workers)
    k, m1, m2 = 9, 8, 9
    reference = build_loader(cfg, TOK, "train")
    ref = take(iter(reference), k + m1 + m2)
    assert max(c["epoch"] for c in reference.state_dict()["cursor"]) >= 1  # the run crossed an epoch boundary

    first = build_loader(cfg, TOK, "train")
    it = iter(first)
    assert_same(take(it, k), ref[:k])
    state = roundtrip(first.state_dict())
    assert_same(take(it, 2), ref[k:k + 2])  # saving does not disturb the running loader

    second = build_loader(cfg, TOK, "train")
    second.load_state_dict(state)
    it2 = iter(second)
    assert_same(take(it2, m1), ref[k:k + m1])
    state2 = roundtrip(second.state_dict())

    third = build_loader(cfg, TOK, "train")
    third.load_state_dict(state2)
    assert_same(take(iter(third), m2), ref[k + m1:])


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
    cfg = make_cfg([str(write_jsonl(tmp_path / "d.jsonl", docs))], seq_len=47, batch=2, eval_fraction=0.3,
                   bos_aligned_eval=True)
    loader = build_loader(cfg, TOK, "eval")
    first = take(iter(loader), 3)
    assert_same(take(iter(loader), 3), first)  # every evaluation sees the same batches
    for batch in first:
        assert bool((batch["tokens"][:, 0] == TOK.bos_id).all())
        assert TOK.pad_id not in batch["tokens"]
    with pytest.raises(UserError, match="no eval split"):
        build_loader(make_cfg(cfg.data.sources, eval_fraction=0.0), TOK, "eval")


def consumed_tags(batches):
    return set().union(*(doc_tags(TOK.decode(row)) for b in batches for row in b["tokens"].tolist()))


@pytest.mark.parametrize("new_world, new_workers", [(1, 2), (2, 0)])
def test_resume_on_another_layout_repeats_no_document(tmp_path, new_world, new_workers):
    docs = make_docs(400, max_words=20)
    path = str(write_jsonl(tmp_path / "d.jsonl", docs))
    cfg = make_cfg([path], seq_len=31, batch=4, shuffle=16)
    loader = build_loader(cfg, TOK, "train")
    before = consumed_tags(take(iter(loader), 20))
    state = roundtrip(loader.state_dict())

    new_cfg = make_cfg([path], seq_len=31, batch=4, shuffle=16, workers=new_workers)
    after = set()
    for rank in range(new_world):
        resumed = build_loader(new_cfg, TOK, "train", rank, new_world)
        with pytest.warns(UserWarning, match="no document is repeated"):
            resumed.load_state_dict(state)
        after |= consumed_tags(take(iter(resumed), 15))
    assert before and after
    assert not before & after
    last_before = max(int(t[1:]) for t in before)
    assert min(int(t[1:]) for t in after) > last_before  # it continued past everything consumed


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
    monkeypatch.setattr(shards, "build_shard_loader", lambda *args: calls.append(args) or "shard-loader",
                        raising=False)
    cfg = make_cfg([str(tmp_path)], seq_len=16, batch=2, shuffle=5, workers=1)
    assert build_loader(cfg, TOK, "train", 1, 2) == "shard-loader"
    assert calls == [(str(tmp_path), TOK, "train", 2, 16, 1, 2, 1, cfg.train.seed, 5)]
    with pytest.raises(UserError, match="only data.sources entry"):
        build_loader(make_cfg([str(tmp_path), "stdlib"]), TOK, "train")


def _two_rank_cursor(path: str) -> tuple[list, list]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = build_loader(make_cfg([path], seq_len=31, batch=2, shuffle=0), TOK, "train", rank, 2)
    take(iter(loader), 6)
    own = [dict(c) for c in loader._cursors[0]]
    return own, loader.state_dict()["cursor"]  # state_dict() gathers the cursor over both ranks


def test_cursor_is_gathered_over_ranks(tmp_path):
    from dist_helpers import run_ranks

    # rank 0 reads the long documents (even indices), rank 1 the short ones: their positions differ
    docs = [("<l%05d> " % i) + "x" * 200 if i % 2 == 0 else "<s%05d>" % i for i in range(400)]
    path = str(write_jsonl(tmp_path / "d.jsonl", docs))
    (own0, global0), (own1, global1) = run_ranks(_two_rank_cursor, 2, path, timeout=120)
    assert global0 == global1
    assert own0[0]["position"]["index"] != own1[0]["position"]["index"]
    furthest = max(own0[0]["position"]["index"], own1[0]["position"]["index"])
    assert global0[0]["position"]["index"] == furthest

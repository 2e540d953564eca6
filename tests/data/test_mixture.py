"""Mixtures: the data.sources syntax, achieved proportions, determinism, resume, the held-out split."""

from __future__ import annotations

from collections import Counter

import pytest

from tokenmill.data.mixture import Mixture, SourceCursor, is_eval_doc, merge_cursors, parse_sources, uniform
from tokenmill.data.sources import IndexedSource
from tokenmill.errors import UserError


class ListSource(IndexedSource):
    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.docs = [f"{name}-{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.docs)

    def text(self, i: int) -> str:
        return self.docs[i]


def build(sizes, weights, seed=5, slot=0, n_slots=1, state=None, epochs=None):
    cursors = [
        SourceCursor(
            ListSource(f"s{i}", n),
            i,
            slot,
            n_slots,
            "train",
            0.0,
            seed,
            epochs,
            state=(state["sources"][i] if state else None),
        )
        for i, n in enumerate(sizes)
    ]
    return Mixture(cursors, weights, seed, slot, state=state)


def test_parse_sources_syntax():
    specs = parse_sources(["fineweb-edu:0.45", "smollm-cosmopedia:0.25", "data/code.jsonl:0.2", "stdlib:0.1"])
    assert [s.location for s in specs] == ["fineweb-edu", "smollm-cosmopedia", "data/code.jsonl", "stdlib"]
    assert [round(s.weight, 6) for s in specs] == [0.45, 0.25, 0.2, 0.1]
    assert [s.weight for s in parse_sources(["a:3", "b:1"])] == [0.75, 0.25]
    assert [s.weight for s in parse_sources(["a", "b"])] == [0.5, 0.5]
    assert (
        parse_sources(["HuggingFaceFW/fineweb-edu@sample-10BT"])[0].location == "HuggingFaceFW/fineweb-edu@sample-10BT"
    )
    assert parse_sources(["C:/data/x.jsonl"])[0].location == "C:/data/x.jsonl"
    with pytest.raises(UserError, match="every source a weight or none"):
        parse_sources(["a:0.5", "b"])
    with pytest.raises(UserError, match="must be > 0"):
        parse_sources(["a:0", "b:1"])
    with pytest.raises(UserError, match="empty"):
        parse_sources([])


def test_proportions_within_two_percent_over_10k_documents():
    weights = [0.45, 0.25, 0.20, 0.10]
    mix = build([50, 37, 23, 11], weights)  # small sources: they cycle epochs independently
    counts = Counter(mix.next_doc()[0] for _ in range(10_000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10_000 - w) < 0.02, (i, counts)
    assert mix.cursors[3].epoch > 50  # the 11-document source repeated many times, the others kept going


def draw(n=200, **kw):
    mix = build([30, 30], [0.5, 0.5], **kw)
    return [mix.next_doc() for _ in range(n)]


def test_sampling_is_deterministic_per_seed_and_slot():
    assert draw(seed=1) == draw(seed=1)
    assert draw(seed=1) != draw(seed=2)
    assert draw(seed=1, slot=0, n_slots=2) != draw(seed=1, slot=1, n_slots=2)


def test_mixture_state_resumes_exactly_across_epochs():
    mix = build([13, 7, 5], [0.5, 0.3, 0.2])
    [mix.next_doc() for _ in range(41)]
    state = mix.state_dict()
    expected = [mix.next_doc() for _ in range(60)]
    resumed = build([13, 7, 5], [0.5, 0.3, 0.2], state=state)
    assert [resumed.next_doc() for _ in range(60)] == expected
    # resume a second time, from the resumed one
    state2 = resumed.state_dict()
    more = [resumed.next_doc() for _ in range(30)]
    again = build([13, 7, 5], [0.5, 0.3, 0.2], state=state2)
    assert [again.next_doc() for _ in range(30)] == more


def test_finite_epochs_stop_and_cover_each_source_once():
    mix = build([9, 4], [0.7, 0.3], epochs=1)
    docs = []
    while (item := mix.next_doc()) is not None:
        docs.append(item[1])
    assert sorted(docs) == sorted([f"s0-{i}" for i in range(9)] + [f"s1-{i}" for i in range(4)])


def test_empty_slot_fails_loudly_instead_of_spinning():
    mix = build([3], [1.0], slot=3, n_slots=4)
    with pytest.raises(UserError, match="no train documents for slot 3 of 4"):
        mix.next_doc()


def test_eval_split_by_content_hash():
    docs = [f"document number {i}" for i in range(5000)]
    held = [d for d in docs if is_eval_doc(d, 0.1)]
    assert 0.08 < len(held) / len(docs) < 0.12
    assert held == [d for d in docs if is_eval_doc(d, 0.1)]  # deterministic
    assert not any(is_eval_doc(d, 0.0) for d in docs)
    assert set(held) <= {d for d in docs if is_eval_doc(d, 0.2)}  # a larger fraction keeps the old eval docs
    train = SourceCursor(ListSource("x", 400), 0, 0, 1, "train", 0.25, 1, epochs=1)
    evals = SourceCursor(ListSource("x", 400), 0, 0, 1, "eval", 0.25, 1, epochs=1)
    t = set(iter(train.next_doc, None))
    e = set(iter(evals.next_doc, None))
    assert t and e and not t & e and len(t | e) == 400


def test_uniform_and_merge_cursors():
    values = [uniform(3, 1, k) for k in range(4000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    a = [{"epoch": 0, "position": {"index": 10}}, {"epoch": 2, "position": {"index": 1}}]
    b = [{"epoch": 0, "position": {"index": 12}}, {"epoch": 1, "position": {"index": 50}}]
    merged = merge_cursors([a, None, b])
    assert merged == [b[0], a[1]]
    assert merge_cursors([None]) is None

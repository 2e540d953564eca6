"""Batches made on a background thread: same items in order, bounded look-ahead, errors in the consumer, clean
stop, tokenization off the calling thread, and an exact resume while the thread is ahead of the trainer."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch

from data_helpers import make_cfg, make_docs, write_jsonl
from tokenmill.data import loader as loader_module
from tokenmill.data.loader import build_loader
from tokenmill.data.prefetch import Prefetcher
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

TOK = Tokenizer.byte()


class Counting:
    """An iterator over 0..n-1 that records how many items were made."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.made = n, fail_at, 0

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.made == self.fail_at:
            raise UserError("source broke")
        if self.made == self.n:
            raise StopIteration
        self.made += 1
        return self.made - 1


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_items_come_in_order_and_the_look_ahead_is_bounded():
    source = Counting(20)
    prefetcher = Prefetcher(source, depth=3)
    wait_until(lambda: source.made == 3)
    time.sleep(0.1)
    assert source.made == 3  # it stops at `depth` items ahead
    assert next(prefetcher) == 0
    wait_until(lambda: source.made == 4)
    assert list(prefetcher) == list(range(1, 20))
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_items_made_before_a_resume_come_first_and_count_in_the_look_ahead():
    source = Counting(5)
    prefetcher = Prefetcher(source, depth=3, ahead=["a", "b"])
    wait_until(lambda: source.made == 1)
    time.sleep(0.1)
    assert source.made == 1
    assert list(prefetcher) == ["a", "b", 0, 1, 2, 3, 4]


def test_a_producer_error_is_raised_in_the_consumer():
    prefetcher = Prefetcher(Counting(20, fail_at=2), depth=4)
    assert [next(prefetcher), next(prefetcher)] == [0, 1]
    with pytest.raises(UserError, match="source broke"):
        next(prefetcher)
    with pytest.raises(UserError, match="source broke"):  # and again, not a silent end
        next(prefetcher)


def prefetch_threads() -> int:
    return sum(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_paused_shows_the_items_made_and_close_stops_the_thread():
    before = prefetch_threads()
    source = Counting(100)
    prefetcher = Prefetcher(source, depth=2)
    wait_until(lambda: source.made == 2)
    with prefetcher.paused() as made:
        assert made == [0, 1]
    assert next(prefetcher) == 0
    prefetcher.close()
    assert prefetch_threads() <= before
    made = source.made
    time.sleep(0.1)
    assert source.made == made <= 3


def test_a_dropped_prefetcher_stops_its_thread():
    before = prefetch_threads()
    prefetcher = Prefetcher(Counting(100), depth=2)
    assert prefetch_threads() >= 1
    del prefetcher
    wait_until(lambda: prefetch_threads() <= before)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_the_loader_tokenizes_off_the_training_thread(tmp_path, monkeypatch):
    threads = set()
    real = Tokenizer.encode_batch

    def encode_batch(self, texts):
        threads.add(threading.current_thread())
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", encode_batch)
    cfg = make_cfg([str(write_jsonl(tmp_path / "d.jsonl", make_docs(40, max_words=14)))], seq_len=31, batch=2)
    loader = build_loader(cfg, TOK, "train")
    next(iter(loader))
    loader.close()
    assert threads and threading.current_thread() not in threads


def test_resume_is_exact_while_the_thread_is_ahead(tmp_path):
    cfg = make_cfg([str(write_jsonl(tmp_path / "d.jsonl", make_docs(40, max_words=14)))], seq_len=31, batch=2)
    reference = build_loader(cfg, TOK, "train")
    ref = [next(iter(reference)) for _ in range(12)]
    reference.close()

    first = build_loader(cfg, TOK, "train")
    it = iter(first)
    got = [next(it) for _ in range(3)]
    state = roundtrip(first.state_dict())
    assert len(state["ahead"]) == loader_module.PREFETCH_BATCHES  # always a full look-ahead: same bytes every run
    got += [next(it) for _ in range(2)]  # saving does not disturb the running loader
    first.close()

    second = build_loader(cfg, TOK, "train")
    second.load_state_dict(state)
    it2 = iter(second)
    resumed = [next(it2) for _ in range(9)]
    second.close()
    for a, b in zip(got[:3] + resumed, ref, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["doc_ids"], b["doc_ids"])
    for a, b in zip(got[3:], ref[3:5], strict=True):
        assert torch.equal(a["tokens"], b["tokens"])

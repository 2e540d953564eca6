"""Packing: exact windows, no padding, EOS at every document end, doc_ids, BOS alignment, resumable buffer."""

from __future__ import annotations

import torch

from data_helpers import make_docs
from tokenmill.data.packing import Packer, doc_ids_of
from tokenmill.data.tokenizer import Tokenizer

TOK = Tokenizer.byte()


def supply(docs):
    it = iter(docs)
    return lambda: next(it, None)


def all_windows(packer, next_doc):
    out = []
    while (w := packer.next_window(next_doc)) is not None:
        out.append(w)
    return out


def reference_stream(docs):
    stream = []
    for d in docs:
        stream += list(d.encode("utf-8")) + [TOK.eos_id]
    return stream


def test_windows_are_the_eos_joined_stream_cut_exactly():
    docs = make_docs(200, max_words=40)
    window = 33
    packer = Packer(TOK, window, chunk_chars=500)  # many small chunks: chunk borders must not matter
    windows = all_windows(packer, supply(docs))
    stream = reference_stream(docs)
    assert len(windows) == len(stream) // window
    assert all(w.shape == (window,) and w.dtype == torch.int32 for w in windows)
    flat = torch.cat(windows).tolist()
    assert flat == stream[: len(flat)]  # nothing padded, dropped or reordered; only the short tail is left
    assert len(stream) - len(flat) < window
    assert TOK.pad_id not in flat
    assert flat.count(TOK.eos_id) == sum(1 for i, t in enumerate(stream[: len(flat)]) if t == TOK.eos_id)


def test_eos_marks_every_document_end_and_doc_ids_follow():
    docs = ["aaa", "bb", "cccccccc", "d", "eeeeee"]
    packer = Packer(TOK, 6)
    rows = torch.stack(all_windows(packer, supply(docs)))
    # stream: aaa E bb E cccccccc E d E eeeeee E  (24 tokens -> 4 windows of 6)
    assert rows.shape == (4, 6)
    text = TOK.decode(rows.flatten().tolist())
    assert text == "aaa<|eos|>bb<|eos|>cccccccc<|eos|>d<|eos|>eeeeee<|eos|>"[: len(text)]
    ids = doc_ids_of(rows.to(torch.int64), TOK.eos_id)
    # row 0 = a a a E b b -> docs 0 0 0 0 1 1 ; row 1 = E c c c c c -> 0 1 1 1 1 1
    assert ids[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert ids[1].tolist() == [0, 1, 1, 1, 1, 1]
    assert ids[2].tolist() == [0, 0, 0, 0, 1, 1]  # c c c E d E
    assert ids[3].tolist() == [0, 0, 0, 0, 0, 0]  # e e e e e e


def test_doc_ids_match_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (5, 40), generator=gen)
    eos = 0
    got = doc_ids_of(tokens, eos)
    for row, ids in zip(tokens.tolist(), got.tolist()):
        expected, current = [], 0
        for t in row:
            expected.append(current)
            current += t == eos
        assert ids == expected
    assert bool((got[:, 1:] >= got[:, :-1]).all())


def test_bos_aligned_windows_start_at_document_starts():
    docs = make_docs(60, max_words=12)
    window = 40
    rows = all_windows(Packer(TOK, window, bos_aligned=True), supply(docs))
    assert rows and all(r.shape == (window,) for r in rows)
    starts = set()
    for r in rows:
        r = r.tolist()
        assert r[0] == TOK.bos_id and TOK.pad_id not in r
        text = TOK.decode(r)
        first = text.split("<|eos|>")[0].removeprefix("<|bos|>")
        assert any(d.startswith(first) for d in docs)  # a real document start, possibly cropped
        starts.add(first[:8])
    assert len(starts) == len(rows)  # every window starts a different document


def test_packing_state_resumes_exactly():
    docs = make_docs(120, max_words=30)
    window = 17
    whole = all_windows(Packer(TOK, window, chunk_chars=300), supply(docs))

    packer = Packer(TOK, window, chunk_chars=300)
    it = iter(docs)
    next_doc = lambda: next(it, None)  # noqa: E731
    head = [packer.next_window(next_doc) for _ in range(23)]
    state = packer.state_dict()
    consumed = packer.documents
    resumed = Packer(TOK, window, chunk_chars=300)
    resumed.load_state_dict(state)
    rest = all_windows(resumed, supply(docs[consumed:]))
    assert len(head) + len(rest) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, whole))

"""Packing: documents -> token windows of exactly seq_len + 1 tokens, no padding.

Default (training) layout: every document is followed by EOS and the token stream is cut into
consecutive, non-overlapping windows, so a window may start or end inside a document:

    doc A ........ EOS doc B ..... EOS doc C ...   ->   [A A A A EOS B B] [B B B EOS C C C] ...

The model reads window[:-1] and predicts window[1:]. `doc_ids` numbers the documents inside each
window (0, 1, 2, ...; it increases on the token after each EOS), which is all document masking needs.
Because the tokenizer never emits EOS for text (see tokenizer.py), EOS positions are exactly the
document ends.

BOS-aligned layout (eval, `data.bos_aligned_eval`): each document is BOS + tokens + EOS, every window
starts at a document start, and a document that does not fit the rest of the window is cropped to fill
it exactly (the cropped tail is dropped). No padding either way.

Documents are tokenized in chunks (many documents per `encode_batch` call) for speed; the tokens not yet
cut into windows are the "packing buffer" and are part of `state_dict()`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tokenmill.data.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 18  # characters per encode_batch call: large enough to amortise, small enough for state
CHUNK_DOCS = 512


def doc_ids_of(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of each position within its row: the number of EOS tokens strictly before it."""
    is_eos = (tokens == eos_id).to(torch.int64)
    return torch.cumsum(is_eos, dim=-1) - is_eos


class Packer:
    """Turns a document supply into windows of `window` tokens (int32 rows), resumably."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        window: int,
        bos_aligned: bool = False,
        chunk_chars: int = CHUNK_CHARS,
        chunk_docs: int = CHUNK_DOCS,
    ) -> None:
        self.tok = tokenizer
        self.window = window
        self.row_shape = (window,)
        self.bos_aligned = bos_aligned
        self.chunk_chars, self.chunk_docs = chunk_chars, chunk_docs
        self._ready = np.zeros((0, window), dtype=np.int32)  # complete windows not yet handed out
        self._next = 0  # row of _ready to hand out next
        self._tail = np.zeros(0, dtype=np.int32)  # tokens of the next, incomplete window
        self.documents = 0  # documents consumed (statistics)

    # -- supply ---------------------------------------------------------------------------------------
    def _pull(self, next_doc: Callable[[], str | None]) -> bool:
        """Tokenize one chunk of documents into windows; False when the supply is exhausted."""
        texts: list[str] = []
        chars = 0
        while chars < self.chunk_chars and len(texts) < self.chunk_docs:
            text = next_doc()
            if text is None:
                break
            texts.append(text)
            chars += len(text)
        if not texts:
            return False
        self.documents += len(texts)
        ids = self.tok.encode_batch(texts)
        if self.bos_aligned:
            self._add_aligned(ids)
        else:
            self._add_stream(ids)
        return True

    def _add_stream(self, ids: list[list[int]]) -> None:
        eos = self.tok.eos_id
        for row in ids:
            row.append(eos)
        count = sum(len(row) for row in ids)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=count)
        flat = np.concatenate([self._tail, flat])
        n = len(flat) // self.window
        self._set_ready(flat[: n * self.window].reshape(n, self.window))
        self._tail = flat[n * self.window :].copy()

    def _add_aligned(self, ids: list[list[int]]) -> None:
        bos, eos, w = self.tok.bos_id, self.tok.eos_id, self.window
        prefix = [] if bos == eos else [bos]  # a tokenizer whose BOS is its EOS already separates documents
        rows: list[np.ndarray] = []
        current = list(self._tail)
        for row in ids:
            doc = prefix + row + [eos]
            room = w - len(current)
            current.extend(doc[:room])  # crop the document to the room left; its rest is dropped
            if len(current) == w:
                rows.append(np.asarray(current, dtype=np.int32))
                current = []
        self._tail = np.asarray(current, dtype=np.int32)
        self._set_ready(np.stack(rows) if rows else np.zeros((0, w), dtype=np.int32))

    def _set_ready(self, new: np.ndarray) -> None:
        rest = self._ready[self._next :]
        self._ready = np.concatenate([rest, new]) if len(rest) else new
        self._next = 0

    # -- output ---------------------------------------------------------------------------------------
    def next_window(self, next_doc: Callable[[], str | None]) -> torch.Tensor | None:
        """The next window (int32, shape (window,)), or None when the supply ran out (the tail is dropped)."""
        while self._next >= len(self._ready):
            if not self._pull(next_doc):
                return None
        row = torch.from_numpy(self._ready[self._next].copy())
        self._next += 1
        return row

    def batch(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch of B windows: tokens (B, T+1) and doc_ids (B, T+1), int64."""
        tokens = torch.stack(rows).to(torch.int64)
        return {"tokens": tokens, "doc_ids": doc_ids_of(tokens, self.tok.eos_id)}

    def stats(self) -> dict[str, int]:
        return {"documents": self.documents}

    def state_dict(self) -> dict[str, Any]:
        return {
            "ready": torch.from_numpy(self._ready[self._next :].copy()),
            "tail": torch.from_numpy(self._tail.copy()),
            "documents": self.documents,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ready = state["ready"].numpy().astype(np.int32)
        if ready.ndim != 2 or ready.shape[1] != self.window:
            raise ValueError(f"packing state holds windows of {ready.shape[-1]} tokens, expected {self.window}")
        self._ready, self._next = ready, 0
        self._tail = state["tail"].numpy().astype(np.int32)
        self.documents = int(state.get("documents", 0))

"""Packing for supervised fine-tuning: whole examples in windows, the loss only on what the model should learn.

An example is its token ids and, per token, whether it is learned: the completion (or the assistant turns)
and the EOS appended after it are; the prompt is context. In a window of seq_len + 1 tokens the model reads
window[:-1] and is scored on targets (seq_len,), where target j is token j + 1 when that token is learned and
IGNORE_INDEX (-100) otherwise, so prompt tokens add nothing to the loss and the engine's denominator counts
only learned tokens. The first token of an example is never a target: it would be predicted across examples.

Packing keeps examples whole: examples fill a window in their stream order while they fit, the rest of the
window is padding (target -100, a document of its own), and the next example starts the next window. Each
example is its own document (`doc_ids` 0, 1, 2, ... within the window), so with document masking an example
attends only to itself and its positions start at 0, as they do when `generate` or `serve` answer a prompt.
An example longer than the window is truncated to its first seq_len + 1 tokens (a warning says so, and the
run's end counts them); one whose prompt alone fills the window has nothing left to learn and is dropped.

Rows are int32 (3, seq_len + 1): tokens, labels (the token where learned, else -100; targets = labels[1:]) and
doc ids; the packing buffer (complete rows not handed out, and the open row) is part of `state_dict()`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tokenmill.data.chat_template import special_token_ids, split_specials
from tokenmill.data.sft_source import parse_example
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError
from tokenmill.levers.loss import IGNORE_INDEX

ROWS = 3  # tokens, labels, doc ids
CHUNK_EXAMPLES = 256  # examples tokenized per pull
MAX_DROPPED_IN_A_ROW = 1024  # then no example fits: stop instead of reading the data forever


def encode_examples(
    tokenizer: Tokenizer, documents: list[str], specials: dict[str, int]
) -> list[tuple[list[int], list[bool]]]:
    """(token ids, learned flag per token) of each example document, EOS appended unless its text ends with it.

    All plain-text pieces of the chunk go through one `encode_batch` call: a call costs far more than a short
    text does.
    """
    texts: list[str] = []
    layouts = []  # per example, per segment: (learned, pieces: an index into `texts` or [special token id])
    for document in documents:
        segments, templated = parse_example(document)
        layout = []
        for segment in segments:
            pieces: list[int | list[int]] = []
            for piece in split_specials(segment.text, specials) if templated else [segment.text]:
                if isinstance(piece, str):
                    pieces.append(len(texts))
                    texts.append(piece)
                else:
                    pieces.append([piece])
            layout.append((segment.learned, pieces))
        layouts.append(layout)
    encoded = tokenizer.encode_batch(texts) if texts else []
    examples = []
    for layout in layouts:
        ids: list[int] = []
        learned: list[bool] = []
        for is_learned, pieces in layout:
            for piece in pieces:
                piece_ids = encoded[piece] if isinstance(piece, int) else piece
                ids += piece_ids
                learned += [is_learned] * len(piece_ids)
        if not ids or ids[-1] != tokenizer.eos_id:
            ids.append(tokenizer.eos_id)
            learned.append(layout[-1][0])
        examples.append((ids, learned))
    return examples


class SftPacker:
    """Turns a supply of example documents into packed rows (int32, (3, window)), resumably."""

    def __init__(self, tokenizer: Tokenizer, window: int, chunk_examples: int = CHUNK_EXAMPLES) -> None:
        self.tok = tokenizer
        self.window = window
        self.row_shape = (ROWS, window)
        self.chunk_examples = chunk_examples
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self._specials: dict[str, int] | None = None
        self._ready: list[np.ndarray] = []  # complete rows not yet handed out
        self._open: list[np.ndarray] = []  # (3, n) blocks of the examples in the row being filled
        self.documents = 0  # examples consumed (statistics)
        self.truncated = 0  # examples cut to the window
        self.dropped = 0  # examples with nothing left to learn after the cut
        self._dropped_in_a_row = 0

    # -- supply ---------------------------------------------------------------------------------------
    def _pull(self, next_doc: Callable[[], str | None]) -> bool:
        """Tokenize and pack one chunk of examples; False when the supply is exhausted."""
        if self._specials is None:
            self._specials = special_token_ids(self.tok)
        documents = []
        while len(documents) < self.chunk_examples:
            document = next_doc()
            if document is None:
                break
            documents.append(document)
        if not documents:
            return False
        self.documents += len(documents)
        for ids, learned in encode_examples(self.tok, documents, self._specials):
            self._add(ids, learned)
        return True

    def _add(self, ids: list[int], learned: list[bool]) -> None:
        if len(ids) > self.window:
            if self.truncated == 0:
                warnings.warn(
                    f"data: an SFT example of {len(ids)} tokens is longer than train.seq_len + 1 = {self.window}: "
                    f"it is truncated to its first {self.window} tokens (the run's end reports how many were)",
                    stacklevel=2,
                )
            self.truncated += 1
            ids, learned = ids[: self.window], learned[: self.window]
        if not any(learned[1:]):  # the first token is never a target
            self.dropped += 1
            self._dropped_in_a_row += 1
            if self._dropped_in_a_row >= MAX_DROPPED_IN_A_ROW:
                raise UserError(
                    f"the last {MAX_DROPPED_IN_A_ROW} SFT examples all have prompts of at least train.seq_len + 1 = "
                    f"{self.window} tokens, leaving no completion token to learn: raise train.seq_len (and "
                    f"model.max_seq_len) or shorten the prompts"
                )
            return
        self._dropped_in_a_row = 0
        if sum(block.shape[1] for block in self._open) + len(ids) > self.window:
            self._close()
        tokens = np.asarray(ids, dtype=np.int32)
        labels = np.where(np.asarray(learned), tokens, IGNORE_INDEX).astype(np.int32)
        labels[0] = IGNORE_INDEX
        doc = np.full(len(ids), len(self._open), dtype=np.int32)
        self._open.append(np.stack([tokens, labels, doc]))

    def _close(self) -> None:
        """Pad the open row to the window and move it to the ready rows."""
        used = sum(block.shape[1] for block in self._open)
        n_pad = self.window - used
        pad = np.stack(
            [
                np.full(n_pad, self.pad, dtype=np.int32),
                np.full(n_pad, IGNORE_INDEX, dtype=np.int32),
                np.full(n_pad, len(self._open), dtype=np.int32),  # padding is a document of its own
            ]
        )
        self._ready.append(np.concatenate([*self._open, pad], axis=1))
        self._open = []

    # -- output ---------------------------------------------------------------------------------------
    def next_window(self, next_doc: Callable[[], str | None]) -> torch.Tensor | None:
        """The next packed row (int32, (3, window)), or None when the supply ran out (the open row included)."""
        while not self._ready:
            if not self._pull(next_doc):
                if not self._open:
                    return None
                self._close()  # a finite supply (eval, or a training run with an epoch limit) ends with its rest
        return torch.from_numpy(self._ready.pop(0))

    def batch(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch of B packed rows: tokens (B, T+1), targets (B, T) and doc_ids (B, T+1), int64."""
        packed = torch.stack(rows).to(torch.int64)  # (B, 3, T+1)
        return {"tokens": packed[:, 0], "targets": packed[:, 1, 1:], "doc_ids": packed[:, 2]}

    def stats(self) -> dict[str, int]:
        return {"documents": self.documents, "examples_truncated": self.truncated, "examples_dropped": self.dropped}

    def state_dict(self) -> dict[str, Any]:
        ready = np.stack(self._ready) if self._ready else np.zeros((0, *self.row_shape), dtype=np.int32)
        open_row = np.concatenate(self._open, axis=1) if self._open else np.zeros((ROWS, 0), dtype=np.int32)
        return {
            "ready": torch.from_numpy(ready),
            "open": torch.from_numpy(open_row),
            "documents": self.documents,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "dropped_in_a_row": self._dropped_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ready = state["ready"].numpy().astype(np.int32)
        if ready.ndim != 3 or tuple(ready.shape[1:]) != self.row_shape:
            raise ValueError(
                f"SFT packing state holds rows of shape {tuple(ready.shape[1:])}, expected {self.row_shape}"
            )
        self._ready = list(ready)
        open_row = state["open"].numpy().astype(np.int32)
        # split the open row back into its examples by doc id, so the next example gets the next id
        self._open = [open_row[:, open_row[2] == d] for d in np.unique(open_row[2])] if open_row.shape[1] else []
        self.documents = int(state.get("documents", 0))
        self.truncated = int(state.get("truncated", 0))
        self.dropped = int(state.get("dropped", 0))
        self._dropped_in_a_row = int(state.get("dropped_in_a_row", 0))

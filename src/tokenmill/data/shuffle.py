"""Shuffle buffers with a counter-based RNG: windows before batching, documents of streaming sources.

A buffer keeps up to `size` items; each draw refills it from the producer and hands out the item at a random
slot, drawn as uniform(seed, stream, k) for the k-th draw (SplitMix64), so the whole RNG state is the draw
counter and a resumed buffer continues exactly. When the producer runs dry the buffer drains, so a finite
supply (one epoch of a source) comes out whole: every item exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenmill.data.rng import uniform


class RandomBuffer:
    """Up to `size` items, handed out in random order; size 0 passes items straight through."""

    def __init__(self, size: int, seed: int, stream: int) -> None:
        self.size, self.seed, self.stream = size, seed, stream
        self.items: list[Any] = []
        self.draws = 0

    def next(self, produce: Callable[[], Any]) -> Any:
        """A random buffered item after refilling from `produce` (None = supply exhausted), or None when empty."""
        if self.size == 0:
            return produce()
        while len(self.items) < self.size:
            item = produce()
            if item is None:
                break  # drain what is left
            self.items.append(item)
        if not self.items:
            return None
        j = int(uniform(self.seed, self.stream, self.draws) * len(self.items))
        self.draws += 1
        out = self.items[j]
        self.items[j] = self.items[-1]
        self.items.pop()
        return out


class WindowBuffer(RandomBuffer):
    """Token windows (int32 rows of one shape: (window,), or (3, window) for SFT rows) between the packer and the
    batches."""

    def __init__(self, size: int, window: int | tuple[int, ...], seed: int, stream: int) -> None:
        super().__init__(size, seed, stream)
        self.row_shape = (window,) if isinstance(window, int) else tuple(window)

    def state_dict(self) -> dict[str, Any]:
        rows = torch.stack(self.items) if self.items else torch.zeros((0, *self.row_shape), dtype=torch.int32)
        return {"windows": rows, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        windows = state["windows"]
        if self.size == 0 or windows.shape[0] > self.size or tuple(windows.shape[1:]) != self.row_shape:
            raise ValueError("shuffle-buffer state does not match this loader")
        self.items = list(windows.to(torch.int32).unbind(0))
        self.draws = int(state["draws"])


class DocumentBuffer(RandomBuffer):
    """Document texts of a streaming source, so a stream sorted by topic is not trained one topic at a time."""

    def state_dict(self) -> dict[str, Any]:
        return {"docs": list(self.items), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.items = [str(d) for d in state.get("docs", [])]
        self.draws = int(state.get("draws", 0))

"""Preallocated key/value cache for incremental decoding: one prefill, then one token per step.

Layout: per layer, keys and values of shape (B, n_kv_heads, capacity, head_dim). Grouped-query models cache
their kv heads only (mlc-ai/mlc-llm#576), with the configured head width `resolved_head_dim()`, not
d_model / n_heads (LMCache/LMCache#688).

Slot = position: the token at position p of row b is stored in slot p of row b, and a query at position p
sees key slot s iff s <= p. Rows are therefore independent: prompts of different lengths need no left
padding (a shorter prompt is right-padded in the prefill and its padding sits in slots the row's later
tokens overwrite before they can see them), and rows can be copied, moved and replaced one at a time.
Slots past a row's position may hold stale values; the mask hides them. Buffers start at zero rather than
uninitialised, because a hidden slot is still multiplied by its attention weight 0, and 0 * NaN is NaN.

`view(rows, span)` is a cache over some rows and the first `span` slots that shares storage, so eager
decoding reads only the filled prefix, while a compiled decode step uses the whole buffer (the same shapes
and addresses every step, as in gpt-fast's static cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.config import ModelConfig


@dataclass
class LayerKV:
    """One layer's cache for one forward: the (B, H_kv, span, hd) buffers and where this forward writes."""

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor  # (B, 1) row index of each new token
    positions: torch.Tensor  # (B, T) position (= slot) of each new token

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H_kv, T, hd) keys/values at their positions; return the whole (B, H_kv, span, hd).

        One index_put per tensor (indexed dims go first: the value is (B, T, H_kv, hd)). Inductor does index_put
        in place on the cache; a scatter_ into a graph input is functionalised and the whole buffer copied back
        every step, which made the compiled decode step slower than eager.
        """
        if k.dtype != self.keys.dtype:  # index_put needs equal dtypes (bf16 autocast over an fp32 cache)
            k, v = k.to(self.keys.dtype), v.to(self.values.dtype)
        self.keys[self.rows, :, self.positions] = k.transpose(1, 2)
        self.values[self.rows, :, self.positions] = v.transpose(1, 2)
        return self.keys, self.values


class KVCache:
    """Keys and values of every layer; see the module docstring for the slot = position layout."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys  # per layer (B, H_kv, S, hd)
        self.values = values

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch_size: int, capacity: int, device: str | torch.device, dtype: torch.dtype
    ) -> KVCache:
        """Zeroed buffers for `batch_size` rows of `capacity` positions (at most cfg.max_seq_len)."""
        capacity = min(capacity, cfg.max_seq_len)
        shape = (batch_size, cfg.kv_heads(), capacity, cfg.resolved_head_dim())
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        return cls(keys, values)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def span(self) -> int:
        """Slots attention reads: positions 0 .. span-1."""
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def view(self, rows: slice, span: int) -> KVCache:
        """Rows `rows` and slots 0 .. span-1, sharing storage (writes land in this cache)."""
        return KVCache([k[rows, :, :span] for k in self.keys], [v[rows, :, :span] for v in self.values])

    def layer(self, i: int, rows: torch.Tensor, positions: torch.Tensor) -> LayerKV:
        """Layer i's cache for a forward writing (B, T) `positions` of rows (B, 1) `rows` (0 .. B-1 of this view)."""
        return LayerKV(self.keys[i], self.values[i], rows, positions)

    def copy_rows(self, source: KVCache, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Row dst[j] slots [0, length) := source's row src[j] (one prefill feeding n samples; moving rows).

        `source` may be this cache; the rows read are gathered before any is written.
        """
        for mine, theirs in zip((*self.keys, *self.values), (*source.keys, *source.values), strict=False):
            mine[dst, :, :length] = theirs[src, :, :length]

    def resized(self, batch_size: int, capacity: int) -> KVCache:
        """A cache of another size holding this one's rows and slots that fit (the old buffers can be dropped)."""
        rows, slots = min(batch_size, self.batch_size), min(capacity, self.span)
        out = []
        for t in (*self.keys, *self.values):
            new = torch.zeros((batch_size, t.shape[1], capacity, t.shape[3]), dtype=t.dtype, device=t.device)
            new[:rows, :, :slots] = t[:rows, :, :slots]
            out.append(new)
        return KVCache(out[: len(self.keys)], out[len(self.keys) :])


def cached_causal_mask(positions: torch.Tensor, span: int) -> torch.Tensor:
    """(B, T) query positions -> (B, 1, T, span) bool: key slot s visible iff s <= the query's position.

    This is the bottom-right aligned causal mask of each row (SDPA's `is_causal` is top-left aligned when the
    query and key lengths differ, pytorch/pytorch#108108), so it is always passed explicitly.
    """
    slots = torch.arange(span, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]

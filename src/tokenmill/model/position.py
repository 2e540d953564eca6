"""Position encodings, chosen by name through `POSITIONS`: learned, rope, none.

- `learned`: a (max_seq_len, d_model) table added to the token embeddings (GPT-2). The table itself is the
  Transformer's `pos_emb` (state-dict key `pos_emb.weight`); this module only says how to index it.
- `rope`: rotary embeddings (Su et al. 2021, arXiv:2104.09864) in the rotate-half layout of Hugging Face
  Llama: the two halves of each head are the (real, imaginary) parts, so Llama checkpoints need no
  permutation of q/k weights.
- `none`: no position signal (NoPE); causal masking alone breaks the symmetry.

With packed sequences (`doc_ids` given), positions restart at 0 at every document start, so a document
sees the same positions whether it is packed or alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: (B, T) non-decreasing doc ids -> (B, T) int64.

    A document starts where the id changes (and at t=0); position = t - start of the current document.
    """
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_doc = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T)
    return t - start_of_doc


def position_ids(T: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(T,) positions 0..T-1, or (B, T) per-document positions when doc_ids are given."""
    if doc_ids is None:
        return torch.arange(T, device=device)
    return positions_from_doc_ids(doc_ids)


class RotaryEmbedding(nn.Module):
    """Holds the fp32 cos/sin cache (max_seq_len, head_dim / 2) and rotates q and k.

    The cache is a non-persistent buffer: it is not in checkpoints, and `to_empty()` after a meta build leaves
    it uninitialised, so `Transformer.init_weights()` calls `reset_cache()`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)

    @torch.no_grad()
    def reset_cache(self) -> None:
        # inv_freq_i = theta^(-2i/d), angle(p, i) = p * inv_freq_i (RoFormer eq. 15), computed in fp32.
        device = self.cos.device
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: (T,) -> (1, T, 1, hd/2); (B, T) -> (B, T, 1, hd/2)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            cos, sin = cos[None], sin[None]
        return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by the angles in cos/sin (B|1, T, 1, hd/2), rotate-half layout, math in fp32.

    out = x * [cos, cos] + rotate_half(x) * [sin, sin] with rotate_half(x) = [-x2, x1] (Hugging Face Llama).
    """
    # dtype checks instead of unconditional .float()/.to(): an fp32 tensor skips two dispatches per call,
    # which shows in one-token decode steps, where dispatch rather than arithmetic sets the pace
    x1, x2 = (x if x.dtype == torch.float32 else x.float()).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rolled_rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos, sin (..., hd/2) -> the full-width ([cos, cos], [-sin, sin]) that `apply_rope_rolled` takes.

    Built once per cached forward and shared by every layer, so each layer's rotation costs four ops instead of
    eight (a one-token decode step is bound by per-op dispatch, not arithmetic).
    """
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with full-width tables from `rolled_rope_tables`, bit for bit the same result.

    x.roll(hd/2) is [x2, x1], so x * [cos, cos] + [x2, x1] * [-sin, sin] = [x1 cos - x2 sin, x2 cos + x1 sin]:
    the same products and the same sums (a + (-b) equals a - b exactly in IEEE arithmetic).
    """
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclass(frozen=True)
class PositionKind:
    """What a position choice asks of the model: a learned table (`pos_emb`) and/or rotary q/k."""

    table: bool
    rotary: bool


# The keys are POSITION_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
POSITIONS: dict[str, PositionKind] = {
    "learned": PositionKind(table=True, rotary=False),  # GPT-2: pos_emb added to tok_emb
    "rope": PositionKind(table=False, rotary=True),  # Llama: rotate q and k
    "none": PositionKind(table=False, rotary=False),  # NoPE: the causal mask alone orders tokens
}

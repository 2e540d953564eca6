"""Causal self-attention and its backends, chosen by name through `ATTENTION`.

`Attention` owns the projections (q/k/v/o, Hugging Face Llama names), grouped-query heads (`n_kv_heads`),
the optional per-head QK RMSNorm (Qwen3 / OLMo2 style) and RoPE. The score computation is delegated to a
backend with one interface:

    mask = backend.prepare(doc_ids, T, device)   # once per forward, shared by every layer
    out = backend.attend(q, k, v, mask, dropout_p)  # q (B, H, T, hd), k/v (B, H_kv, T, hd) -> (B, H, T, hd)

`doc_ids` (B, T) is the document index of each position in a packed row. With it, attention is
block-diagonal causal (a token sees only earlier tokens of its own document); without it, plain causal
and every backend takes its `is_causal` fast path.

| backend    | no doc_ids                   | doc_ids                                | notes                         |
| ---------- | ---------------------------- | -------------------------------------- | ----------------------------- |
| sdpa       | SDPA is_causal (flash/cuDNN) | SDPA with a (B, 1, T, T) bool mask     | dense mask: O(T^2) memory     |
| eager      | explicit softmax(QK^T)V      | same math with the bool mask           | the reference for the tests   |
| flex       | FlexAttention causal mask    | FlexAttention BlockMask from doc_ids   | no CPU backward in torch 2.13 |
| flash_attn | flash_attn_func causal       | flash_attn_varlen_func with cu_seqlens | CUDA, fp16/bf16 only          |
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import UserError
from tokenmill.model.config import ModelConfig
from tokenmill.model.norms import RMSNorm
from tokenmill.model.position import apply_rope


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> (B, 1, T, T) bool, True where query t may attend key s: s <= t and same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


class SDPABackend:
    """torch.nn.functional.scaled_dot_product_attention; on GPU it dispatches to flash / cuDNN kernels.

    With doc_ids it needs a dense bool mask, which excludes the flash kernel (memory-efficient kernel instead);
    use `flex` or `flash_attn` for long packed sequences on GPU.
    """

    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        return None if doc_ids is None else document_causal_mask(doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        if mask is not None and q.shape[1] != k.shape[1]:
            # enable_gqa is not supported by every masked kernel (SDPA would fall back to math); expand kv heads
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                              enable_gqa=q.shape[1] != k.shape[1])


class EagerBackend:
    """Reference math: softmax(q k^T / sqrt(hd) + mask) v with the softmax in fp32 (Vaswani et al. 2017, eq. 1)."""

    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
        if doc_ids is None:
            return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T) broadcasts over (B, H)
        return document_causal_mask(doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (B, H, T, hd): kv head j serves query heads j*g .. j*g+g-1
        v = v.repeat_interleave(groups, dim=1)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v


@functools.cache
def _compiled_flex_attention() -> Any:
    # FlexAttention is only fast when compiled (eager materialises the full score matrix); compiled once per
    # process on first GPU use. CPU keeps the eager path (forward only: no CPU backward in torch 2.13).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    """FlexAttention (torch.nn.attention.flex_attention) with a BlockMask built from doc_ids.

    The BlockMask skips whole 128x128 tiles that are fully masked, so packed documents cost what they
    compute. Attention-probability dropout is not supported (validated in ModelConfig).
    """

    def __init__(self) -> None:
        self._causal: dict[tuple[int, str], Any] = {}  # (T, device) -> causal BlockMask, reused across steps

    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        on_gpu = device.type == "cuda"
        if doc_ids is None:
            key = (T, str(device))
            if key not in self._causal:
                self._causal[key] = create_block_mask(_causal_mod, None, None, T, T, device=device, _compile=on_gpu)
            return self._causal[key]

        def document_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        return create_block_mask(document_causal, doc_ids.shape[0], None, T, T, device=device, _compile=on_gpu)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
        return fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened document boundaries for varlen kernels: (B, T) -> (cu_seqlens int32 (n_docs + 1,), max_seqlen).

    Every row starts a new document, so a document never spans two rows. `max_seqlen` is a Python int:
    this is a host-device sync (one per forward, not per layer).
    """
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()  # sync: data-dependent size
    ends = torch.cat([start_idx, start_idx.new_tensor([B * T])])
    max_seqlen = int((ends[1:] - ends[:-1]).max().item())  # sync
    return ends.to(torch.int32), max_seqlen


class FlashAttnBackend:
    """Dao-AILab flash-attn 2 (`flash_attn_func`, `flash_attn_varlen_func`); checked at build time."""

    def __init__(self) -> None:
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:
            raise UserError("model.attention=flash_attn needs the flash-attn package (pip install flash-attn "
                            "--no-build-isolation, CUDA only); or use model.attention=sdpa or flex") from err

    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> Any:
        return None if doc_ids is None else cu_seqlens_from_doc_ids(doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        B, H, T, hd = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, heads, hd)
        if mask is None:
            out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        else:
            cu, max_len = mask
            flat = [t.reshape(B * T, t.shape[2], hd) for t in (q, k, v)]  # (B*T, heads, hd)
            out = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=True)
            out = out.view(B, T, H, hd)
        return out.transpose(1, 2)


# The keys are ATTENTION_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
ATTENTION: dict[str, type] = {
    "sdpa": SDPABackend,
    "eager": EagerBackend,
    "flex": FlexBackend,
    "flash_attn": FlashAttnBackend,
}


def build_attention_backend(name: str) -> Any:
    """A backend instance by registry name (flash_attn raises a UserError here when not installed)."""
    return ATTENTION[name]()


class Attention(nn.Module):
    """Multi-head causal self-attention with GQA: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig, backend: Any) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads()
        self.head_dim = cfg.resolved_head_dim()
        self.dropout = cfg.dropout
        self.backend = backend  # plain object shared by all layers (not a module: holds no parameters)
        d, hd = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.bias)
        # QK-norm: one RMSNorm of width hd shared by all heads, applied before RoPE (Qwen3).
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: Any) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        out = self.backend.attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

"""Causal self-attention and its backends, chosen by name through `ATTENTION`.

`Attention` owns the projections (q/k/v/o, Hugging Face Llama names), grouped-query heads (`n_kv_heads`),
the optional per-head QK RMSNorm (Qwen3 / OLMo2 style) and RoPE. The score computation is delegated to a
backend with one interface:

    mask = backend.prepare(doc_ids, T, device)   # once per forward, shared by every layer
    out = backend.attend(q, k, v, mask, dropout_p)  # q (B, H, T, hd), k/v (B, H_kv, T, hd) -> (B, H, T, hd)

and, for generation with a KV cache (`tokenmill.model.kv_cache`), an entry point that writes the new keys and
values into the cache and attends over every cached position the query may see:

    mask = backend.prepare_cached(positions, span)     # (B, T) query positions; keys are cache slots 0..span-1
    out = backend.attend_cached(q, k, v, layer_kv, mask)  # k/v: the T new keys/values (B, H_kv, T, hd)

`doc_ids` (B, T) is the document index of each position in a packed row. With it, attention is
block-diagonal causal (a token sees only earlier tokens of its own document); without it, plain causal
and every backend takes its `is_causal` fast path.

| backend    | no doc_ids                   | doc_ids                                | notes                         |
| ---------- | ---------------------------- | -------------------------------------- | ----------------------------- |
| sdpa       | SDPA is_causal (flash/cuDNN) | SDPA with a (B, 1, T, T) bool mask     | dense mask: O(T^2) memory     |
| eager      | explicit softmax(QK^T)V      | same math with the bool mask           | the reference for the tests   |
| flex       | FlexAttention causal mask    | FlexAttention BlockMask from doc_ids   | no CPU backward in torch 2.13 |
| flash_attn | flash_attn_func causal       | flash_attn_varlen_func with cu_seqlens | CUDA, fp16/bf16 only          |

With a cache, sdpa and eager get an explicit (B, 1, T, span) bool mask (never `is_causal`, which SDPA aligns
top-left when query and key lengths differ: pytorch/pytorch#108108), flex a BlockMask with the same rule, and
flash_attn `flash_attn_with_kvcache`, which writes the cache itself and aligns causally bottom-right.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import UserError
from tokenmill.model.config import ModelConfig
from tokenmill.model.kv_cache import LayerKV, cached_causal_mask
from tokenmill.model.norms import RMSNorm
from tokenmill.model.position import apply_rope, apply_rope_rolled


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> (B, 1, T, T) bool, True where query t may attend key s: s <= t and same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


class AttentionBackend(ABC):
    """The interface every backend implements; the KV-cache entry points default to whole-tensor attention."""

    @abstractmethod
    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> Any:
        """The mask object for a training/scoring forward of T tokens (once per forward, shared by layers)."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, H_kv, Tk, hd) -> (B, H, T, hd)."""

    def check(self, cfg: ModelConfig) -> None:  # noqa: B027 (an optional hook: most backends run every shape)
        """Refuse, when the model is built, a shape this backend cannot run (every shape, by default)."""

    def prepare_cached(self, positions: torch.Tensor, span: int) -> Any:
        """The mask object for a cached forward: (B, T) query positions over cache slots 0..span-1."""
        return cached_causal_mask(positions, span)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV, mask: Any) -> torch.Tensor:
        """Write the T new keys/values into the layer's cache, then attend over the visible cache slots."""
        keys, values = kv.update(k, v)  # (B, H_kv, span, hd)
        return self.attend(q, keys, values, mask, 0.0)


class SDPABackend(AttentionBackend):
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
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
        )

    def prepare_cached(self, positions: torch.Tensor, span: int) -> torch.Tensor:
        # additive (0 / -inf) fp32 mask: SDPA turns a bool mask into this in every layer, here it is done once
        visible = cached_causal_mask(positions, span)
        return torch.zeros(visible.shape, device=positions.device).masked_fill_(~visible, float("-inf"))

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV, mask: Any) -> torch.Tensor:
        keys, values = kv.update(k, v)  # (B, H_kv, span, hd)
        if mask.dtype != q.dtype:  # SDPA takes a float mask of the query's dtype (bf16 under autocast)
            mask = mask.to(q.dtype)
        B, H, T, hd = q.shape
        groups = H // keys.shape[1]
        if groups == 1:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        # GQA without copying the cache per step: the g query heads sharing a kv head become g x T query rows of
        # that head (heads j*g .. j*g+g-1 use kv head j, as repeat_interleave orders them), each with its mask row
        q = q.reshape(B, H // groups, groups * T, hd)
        if T > 1:  # one query row per (group member, token); with T = 1 the (B, 1, 1, span) mask broadcasts
            mask = mask.expand(B, 1, T, mask.shape[-1]).repeat(1, 1, groups, 1)  # (B, 1, g*T, span)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H_kv, g*T, hd)
        return out.view(B, H, T, hd)


class EagerBackend(AttentionBackend):
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


class FlexBackend(AttentionBackend):
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

    def prepare_cached(self, positions: torch.Tensor, span: int) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        def cached_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return kv_idx <= positions[b, q_idx]  # the rule of kv_cache.cached_causal_mask

        B, T = positions.shape
        return create_block_mask(
            cached_causal, B, None, T, span, device=positions.device, _compile=positions.device.type == "cuda"
        )

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


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2 supports head dims up to 256 (its README)


class FlashAttnBackend(AttentionBackend):
    """Dao-AILab flash-attn 2 (`flash_attn_func`, `flash_attn_varlen_func`); checked at build time."""

    def __init__(self) -> None:
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:
            raise UserError(
                "model.attention=flash_attn needs the flash-attn package (pip install flash-attn "
                "--no-build-isolation, CUDA only); or use model.attention=sdpa or flex"
            ) from err

    def check(self, cfg: ModelConfig) -> None:
        hd = cfg.resolved_head_dim()
        if hd > FLASH_MAX_HEAD_DIM or hd % 8:
            raise UserError(
                f"model.attention=flash_attn runs head dims that are multiples of 8 up to "
                f"{FLASH_MAX_HEAD_DIM}, not {hd}: change model.head_dim or use model.attention=sdpa"
            )

    @staticmethod
    def check_inputs(q: torch.Tensor) -> None:
        """flash-attn kernels exist for CUDA fp16/bf16 only; say so instead of failing inside the extension."""
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            raise UserError(
                f"model.attention=flash_attn runs on CUDA in fp16/bf16, not on {q.device.type} in "
                f"{str(q.dtype).removeprefix('torch.')}: use bf16 precision (or weights) on a GPU, "
                f"or model.attention=sdpa"
            )

    def prepare(self, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> Any:
        return None if doc_ids is None else cu_seqlens_from_doc_ids(doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        self.check_inputs(q)
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

    def prepare_cached(self, positions: torch.Tensor, span: int) -> Any:
        # flash_attn_with_kvcache writes row b's T new keys at slots cache_seqlens[b] .. + T-1 and aligns the
        # causal mask bottom-right, which is the slot = position rule when each row's positions are consecutive.
        return positions[:, 0].to(torch.int32)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV, mask: Any) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        self.check_inputs(q)
        # (B, heads, ., hd) -> (B, ., heads, hd) views; the kernel needs only a unit stride on hd
        q, k, v, keys, values = (t.transpose(1, 2) for t in (q, k, v, kv.keys, kv.values))
        out = flash_attn_with_kvcache(q, keys, values, k=k, v=v, cache_seqlens=mask, causal=True)
        return out.transpose(1, 2)


# The keys are ATTENTION_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
ATTENTION: dict[str, type[AttentionBackend]] = {
    "sdpa": SDPABackend,
    "eager": EagerBackend,
    "flex": FlexBackend,
    "flash_attn": FlashAttnBackend,
}


def build_attention_backend(cfg: ModelConfig) -> AttentionBackend:
    """The backend `cfg.attention` names, checked against the model's shape (UserError when it cannot run it,
    or when flash-attn is not installed)."""
    backend = ATTENTION[cfg.attention]()
    backend.check(cfg)
    return backend


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

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: Any, kv: LayerKV | None = None
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d). With `kv`, the T tokens' keys/values go into the cache and the queries see
        every cached position up to their own (`mask` then comes from `backend.prepare_cached`)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # a cached forward gets full-width tables (position.rolled_rope_tables)
            rotate = apply_rope if kv is None else apply_rope_rolled
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if kv is None:
            out = self.backend.attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        else:
            out = self.backend.attend_cached(q, k, v, kv, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

"""A one-token decode step with few ops, for a CPU model the generator has to itself.

At batch 1 a decode step of a small model is a few dozen matrix-vector products plus, through the model's own
modules, ~250 small ops; on a CPU each op costs 5-20 us of dispatch, more than its arithmetic, so the small ops
cost as much as the products (docs/performance.md, "Generation"). This step computes what
`Transformer.next_logits` computes for one new token per row, from the same parameters, with fewer ops:
- q/k/v and gate/up are one matrix product each (`layout.fuse_linears` stores them side by side, the model's
  parameters become views into that storage);
- the products go through NumPy's BLAS (OpenBLAS in NumPy's wheels), on the same memory: on the AMD EPYC where
  this was measured its matrix-vector products took 1.0 ms per tiny token against 1.6 ms for PyTorch's (MKL),
  and the step got 1.07-1.08x faster at batch 1, 1.15-1.27x at batch 8 (docs/performance.md). Its thread pool is held to
  one thread while a step runs (threadpoolctl): beside PyTorch's own threads, two pools made a step 4-16x slower;
- QK-norm (Qwen3) normalises q and k of all heads together (the same LayerNorm trick, below), then multiplies
  each head by its own gain;
- RoPE rotates q and k of all heads together with full-width tables (flip, mul, addcmul);
- RMSNorm is one layer_norm kernel over [x, -x] (F.rms_norm is ~8 ops on a CPU in torch 2.13);
- when every row is at the same position, which is every step of a batch of equal-length prompts, the cache
  writes are slice copies and attention needs no mask (every filled slot is visible to every row);
- the residual stream is a (B, d) matrix updated in place, and every layer writes into the same preallocated
  outputs, whose views are made once.
Results equal the model's up to the order of floating-point sums (tests/generation/test_decode_step.py). The
generator attaches the step as `model.decode_step`, so `model.next_logits` stays the one entry point of a step,
and passes its whole cache (no cache view per step).
Models it does not cover (post-norm, residual scaling, non-fp32 weights) return None from
`build_decode_step` and decode through their modules. Where a C compiler is at hand, `build_decode_step` returns
the same step as one compiled call instead (generation/native_step.py), on the weights this step lays out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn

from tokenmill.generation.layout import WeightArena, apply_column_major, decode_weights, fuse_linears
from tokenmill.generation.native_step import NativeDecodeStep, load_kernel, native_enabled
from tokenmill.model.ffn import ACTIVATIONS, SwiGLU
from tokenmill.model.kv_cache import KVCache
from tokenmill.model.norms import RMSNorm
from tokenmill.model.transformer import Transformer

_SIGNS = torch.tensor([[1.0], [-1.0]])  # (2, 1): x * _SIGNS over (..., 1, hd) is [x, -x] as (..., 2, hd)
Fused = tuple[torch.Tensor, torch.Tensor | None]  # layout.fuse_linears: (in, out) matrix and joined bias
Norm = Callable[["_Buffers"], torch.Tensor]  # the residual stream in the buffers, x (B, d) -> norm(x) (B, d)


def _norm_fn(norm: nn.Module) -> Norm:
    """The module's normalisation of the residual stream x, which is the first half of the (B, 2d) buffer `stream`."""
    d = norm.weight.shape[0]
    if isinstance(norm, RMSNorm):
        # [x, -x] has mean 0 and variance mean(x^2), so LayerNorm over it is x / sqrt(mean(x^2) + eps) in its first
        # half: two kernels (neg into the second half, layer_norm), where F.rms_norm on a CPU is ~8 ops (torch 2.13)
        weight, eps, shape = torch.cat((norm.weight, norm.weight)), norm.eps, [2 * d]

        def rms(buf: _Buffers) -> torch.Tensor:
            torch.neg(buf.x, out=buf.neg_x)
            return torch.native_layer_norm(buf.stream, shape, weight, None, eps)[0].narrow(1, 0, d)

        return rms
    return lambda buf: F.layer_norm(buf.x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _project(x: torch.Tensor, weight_t: np.ndarray, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = x @ weight_t (+ bias): (B, in) @ (in, out), through NumPy's BLAS (see the module docstring)."""
    np.dot(x.numpy(), weight_t, out=out.numpy())
    if bias is not None:
        out.add_(bias)


def _add_projection(buf: _Buffers, h: torch.Tensor, weight_t: np.ndarray, bias: torch.Tensor | None) -> None:
    """x += h @ weight_t (+ bias), in place on the residual stream."""
    np.dot(h.numpy(), weight_t, out=buf.delta)
    np.add(buf.x_np, buf.delta, out=buf.x_np)
    if bias is not None:
        buf.x.add_(bias)


@dataclass
class _Layer:
    """One block's decode weights: fused (in, out) row-major matrices and the two norms."""

    attn_norm: Norm
    qkv_t: np.ndarray  # (d, (H + 2 H_kv) hd)
    qkv_bias: torch.Tensor | None
    qk_gain: torch.Tensor | None  # (H + H_kv, hd): QK-norm's q gain for the query heads, k gain for the kv heads
    o_t: np.ndarray  # (H hd, d)
    o_bias: torch.Tensor | None
    ffn_norm: Norm
    up_t: np.ndarray  # (d, 2 hidden) gate then up for swiglu, (d, hidden) for mlp
    up_bias: torch.Tensor | None
    down_t: np.ndarray  # (hidden, d)
    down_bias: torch.Tensor | None
    gated: bool


def _array(weight: torch.Tensor) -> np.ndarray:
    """The same memory as a NumPy array (no copy): the step multiplies through NumPy's BLAS."""
    return weight.detach().numpy()


def supported(model: nn.Module) -> bool:
    """Whether `FusedDecodeStep` computes this model's step (otherwise the model's own forward does)."""
    if not isinstance(model, Transformer):
        return False
    cfg = model.cfg
    return (
        cfg.norm_position == "pre"
        and all(block.residual_alpha == 1.0 for block in model.blocks)
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    )


class FusedDecodeStep:
    """`next_logits` for one new token per row; built by `build_decode_step`, which lays out the weights."""

    def __init__(self, model: Transformer) -> None:
        cfg = model.cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads(), cfg.resolved_head_dim()
        self.softcap = cfg.logit_softcap
        self.qk_eps = cfg.norm_eps
        arena = WeightArena(sum(w.numel() for w in decode_weights(model)), torch.float32)  # all it reads, one block
        fused = [self._fuse(block, arena) for block in model.blocks]  # before the layout, which skips their views
        apply_column_major(model, arena)  # o, down and the head: their transposes become row-major
        self.layers = [self._layer(block, *pair) for block, pair in zip(model.blocks, fused, strict=True)]
        self.tok_emb = model.tok_emb.weight
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight
        self.final_norm = None if isinstance(model.norm, nn.Identity) else _norm_fn(model.norm)
        self.head_t = _array(model.output_weight().t())  # (d, V)
        self.act = ACTIVATIONS[cfg.activation]
        self.cos = self.sin = None
        if model.rope is not None:  # full-width tables: ([cos, cos], [-sin, sin]) per position, (max_seq_len, 2, hd/2)
            cos, sin = model.rope.cos, model.rope.sin
            halves = (-1, 2, self.head_dim // 2)
            self.cos, self.sin = torch.cat((cos, cos), dim=-1).view(halves), torch.cat((-sin, sin), dim=-1).view(halves)
        self._buffers_by_batch: dict[int, _Buffers] = {}
        self._numpy_blas = ThreadpoolController().select(user_api="blas")

    @staticmethod
    def _fuse(block: nn.Module, arena: WeightArena) -> tuple[Fused, Fused]:
        """The block's q/k/v and its gate/up (or up) as one matrix each, in `arena`."""
        attn, ffn = block.attn, block.ffn
        ups = [ffn.gate_proj, ffn.up_proj] if isinstance(ffn, SwiGLU) else [ffn.up_proj]
        return fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], arena), fuse_linears(ups, arena)

    @staticmethod
    def _layer(block: nn.Module, qkv: Fused, up: Fused) -> _Layer:
        attn, ffn = block.attn, block.ffn
        (qkv_t, qkv_bias), (up_t, up_bias) = qkv, up
        qk_gain = None
        if attn.q_norm is not None:
            qk_gain = torch.cat(
                (attn.q_norm.weight.expand(attn.n_heads, -1), attn.k_norm.weight.expand(attn.n_kv_heads, -1))
            )
        return _Layer(
            attn_norm=_norm_fn(block.attn_norm),
            qkv_t=_array(qkv_t),
            qkv_bias=qkv_bias,
            qk_gain=qk_gain,
            o_t=_array(attn.o_proj.weight.t()),  # row-major once the layout is applied
            o_bias=attn.o_proj.bias,
            ffn_norm=_norm_fn(block.ffn_norm),
            up_t=_array(up_t),
            up_bias=up_bias,
            down_t=_array(ffn.down_proj.weight.t()),
            down_bias=ffn.down_proj.bias,
            gated=isinstance(ffn, SwiGLU),
        )

    def _buffers(self, batch_size: int) -> _Buffers:
        if batch_size not in self._buffers_by_batch:
            self._buffers_by_batch[batch_size] = _Buffers.allocate(self, batch_size)
        return self._buffers_by_batch[batch_size]

    def __call__(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        """Each row's next token at its position -> (B, V) next-token logits; keys/values go into rows 0..B-1 of
        `cache`, which may hold more rows and slots (attention reads slots 0..max(positions) only, so the engine
        passes its whole cache instead of building a view of it every step). Python lists: building index tensors
        costs more than the lookups."""
        with self._numpy_blas.limit(limits=1):
            return self._step(tokens, positions, cache)

    def _step(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        B = len(positions)
        buf = self._buffers(B)
        x = buf.x  # (B, d), updated in place; one row's embedding is a slice, no index tensor
        x.copy_(self.tok_emb.narrow(0, tokens[0], 1) if B == 1 else F.embedding(torch.tensor(tokens), self.tok_emb))
        if all(p == positions[0] for p in positions):
            where, mask = positions[0], None  # every filled slot is visible to every row
            span = where + 1
        else:
            span = max(positions) + 1
            where = torch.tensor(positions)
            visible = torch.arange(span)[None] <= where[:, None]  # kv_cache.cached_causal_mask for T = 1
            mask = torch.zeros(B, 1, 1, span).masked_fill_(~visible[:, None, None], float("-inf"))
            rows = torch.arange(B)
        if self.pos_emb is not None:
            x.add_(self.pos_emb[where])
        if self.cos is not None:
            if mask is None:
                cos, sin = self.cos.select(0, where), self.sin.select(0, where)  # (2, hd/2)
            else:
                cos, sin = self.cos[where][:, None], self.sin[where][:, None]  # (B, 1, 2, hd/2): broadcast over heads
        whole_rows = cache.batch_size == B
        for i, layer in enumerate(self.layers):
            _project(layer.attn_norm(buf), layer.qkv_t, layer.qkv_bias, buf.qkv)
            if layer.qk_gain is not None:  # attention.py: RMSNorm of each q and k head, before RoPE, as LayerNorm
                # over [x, -x] per head (one broadcast product writes both halves), then each head's gain
                torch.mul(buf.qk_pairs_from, _SIGNS, out=buf.qk_pairs)
                unit = torch.native_layer_norm(buf.qk_pairs_flat, buf.pair_shape, None, None, self.qk_eps)[0]
                torch.mul(unit.narrow(2, 0, self.head_dim), layer.qk_gain, out=buf.normed)
            if self.cos is not None:  # position.apply_rope_rolled on q and k of every head at once; flipping the
                # halves is the roll by hd/2 in one kernel (roll is narrow, narrow, cat on a CPU)
                torch.mul(buf.unrotated_halves, cos, out=buf.rotated_halves).addcmul_(
                    buf.unrotated_halves.flip(-2), sin
                )
            keys, values = cache.keys[i], cache.values[i]  # (rows, H_kv, slots, hd)
            if not whole_rows:
                keys, values = keys.narrow(0, 0, B), values.narrow(0, 0, B)
            if mask is None:
                keys.select(2, where).copy_(buf.k)  # select/narrow: cheaper dispatch than indexing with slices
                values.select(2, where).copy_(buf.v)
            else:
                keys[rows, :, where] = buf.k
                values[rows, :, where] = buf.v
            out = F.scaled_dot_product_attention(
                buf.q, keys.narrow(2, 0, span), values.narrow(2, 0, span), attn_mask=mask
            )  # (B, H_kv, g, hd)
            _add_projection(buf, out.view(B, -1), layer.o_t, layer.o_bias)
            _project(layer.ffn_norm(buf), layer.up_t, layer.up_bias, buf.up)
            act = F.silu(buf.gate, inplace=True).mul_(buf.up_half) if layer.gated else self.act(buf.up)
            _add_projection(buf, act, layer.down_t, layer.down_bias)
        if self.final_norm is not None:
            x = self.final_norm(buf)
        logits = torch.from_numpy(np.dot(x.numpy(), self.head_t))  # (B, V)
        return logits if self.softcap <= 0 else self.softcap * torch.tanh(logits / self.softcap)


@dataclass
class _Buffers:
    """What every layer writes in turn, allocated once per batch size with its views, which are dispatches too."""

    stream: torch.Tensor  # (B, 2d): the residual stream x, then room for -x (RMSNorm as LayerNorm over [x, -x])
    x: torch.Tensor  # (B, d) view
    x_np: np.ndarray  # the same memory as x
    delta: np.ndarray  # (B, d): a projection added to x
    neg_x: torch.Tensor  # (B, d) view

    qkv: torch.Tensor  # (B, (H + 2 H_kv) hd)
    qk: torch.Tensor  # (B, H + H_kv, hd) view: q and k as projected
    qk_pairs_from: torch.Tensor  # (B, H + H_kv, 1, hd) view of qk
    qk_pairs: torch.Tensor  # (B, H + H_kv, 2, hd): [x, -x] of each q and k head (QK-norm as LayerNorm)
    qk_pairs_flat: torch.Tensor  # (B, H + H_kv, 2 hd) view
    pair_shape: list[int]  # [2 hd]: that LayerNorm's normalised shape
    normed: torch.Tensor  # (B, H + H_kv, hd): q and k after QK-norm (qk itself when there is none)
    rotated: torch.Tensor  # (B, H + H_kv, hd): q and k after RoPE (normed itself when there is none)
    unrotated_halves: torch.Tensor  # (B, H + H_kv, 2, hd/2) views of normed and rotated: RoPE's two halves of
    rotated_halves: torch.Tensor  # each head
    q: torch.Tensor  # (B, H_kv, g, hd) view: the g query heads of each kv head (Attention's GQA order)
    k: torch.Tensor  # (B, H_kv, hd) view
    v: torch.Tensor  # (B, H_kv, hd) view
    up: torch.Tensor  # (B, 2 hidden) gate then up for swiglu, (B, hidden) for mlp
    gate: torch.Tensor  # (B, hidden) views (swiglu)
    up_half: torch.Tensor

    @classmethod
    def allocate(cls, step: FusedDecodeStep, B: int) -> _Buffers:
        H, H_kv, hd = step.n_heads, step.n_kv_heads, step.head_dim
        layer = step.layers[0]
        d = layer.qkv_t.shape[0]
        stream = torch.empty(B, 2 * d)
        qkv = torch.empty(B, layer.qkv_t.shape[1])
        qk = qkv[:, : (H + H_kv) * hd].view(B, H + H_kv, hd)
        qk_pairs = torch.empty(B, H + H_kv, 2, hd)  # used by QK-norm only; small
        normed = torch.empty(B, H + H_kv, hd) if layer.qk_gain is not None else qk
        rotated = torch.empty(B, H + H_kv, hd) if step.cos is not None else normed
        up = torch.empty(B, layer.up_t.shape[1])
        hidden = up.shape[1] // 2
        return cls(
            stream=stream,
            x=stream[:, :d],
            x_np=stream[:, :d].numpy(),
            delta=np.empty((B, d), dtype=np.float32),
            neg_x=stream[:, d:],
            qkv=qkv,
            qk=qk,
            qk_pairs_from=qk.unsqueeze(2),
            qk_pairs=qk_pairs,
            qk_pairs_flat=qk_pairs.view(B, H + H_kv, 2 * hd),
            pair_shape=[2 * hd],
            normed=normed,
            rotated=rotated,
            unrotated_halves=normed.view(B, H + H_kv, 2, hd // 2),
            rotated_halves=rotated.view(B, H + H_kv, 2, hd // 2),
            q=rotated[:, :H].view(B, H_kv, H // H_kv, hd),
            k=rotated[:, H:],
            v=qkv[:, (H + H_kv) * hd :].view(B, H_kv, hd),
            up=up,
            gate=up[:, :hidden],
            up_half=up[:, hidden:],
        )


def build_decode_step(model: nn.Module, native: bool = True) -> FusedDecodeStep | NativeDecodeStep | None:
    """Lay out an exclusive CPU model's weights for decoding and return its fused step: compiled to C when
    `native` and a compiler is at hand (generation/native_step.py), else this module's (None: not covered, and
    the weights then only get the column-major layout)."""
    if not supported(model):
        apply_column_major(model)
        return None
    fused = FusedDecodeStep(model)
    kernel = load_kernel() if native and native_enabled(model) else None
    return fused if kernel is None else NativeDecodeStep(model, fused, kernel)

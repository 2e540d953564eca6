"""Training memory model for one GPU: static state (weights, gradients, optimizer) and activations.

Static bytes are exact: parameters x bytes per parameter. Activations follow Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), section 4.1: a
GPT block saves s b h (34 + 5 a s / h) bytes in 16-bit (per token and layer: 34 h bytes + 5 a s for
the score matrix). We keep their per-tensor accounting and adapt it to what tokenmill computes:

per token and layer (A = activation bytes: 2 bf16 / 4 fp32; R = 4, the residual stream, which stays
fp32 under autocast; d = d_model, q = n_heads x d_head, kv = n_kv_heads x d_head, f = FFN width):
  attention  R d (norm input) + A d (norm output = q/k/v input) + A (q + 2 kv) (attention inputs; GQA
             shrinks k, v) + A q (attention output = o_proj input) [+ A (q + kv) with QK-norm]
  scores     none with SDPA/flash/flex (they keep only an O(s) log-sum-exp); `eager` saves the
             softmax A n_heads s (Korthikanti's 5 a s term with dropout mask and dropped copy)
  FFN        R d + A d (norm in/out) + 2 A f (mlp: activation input and output) or 4 A f (swiglu:
             gate, up, silu(gate), product)
  dropout    1 byte per element per mask, only when dropout > 0 (2 d per layer, Korthikanti's 2 s b h)
Korthikanti's 34 = 32 (with A = 2, MHA, mlp 4d, R = A) + 2 (dropout masks); we reproduce it exactly
in tests. Per-token statistics (norm rstd, attention log-sum-exp: a few bytes) are left out.

Outside the blocks: final norm (R d + A d) and the loss: fp32 log-probs 4 V bytes per token are saved
for backward (the logits term B S V 4 of the brief); at the start of backward the gradient of the
log-probs and of the logits (2 x 4 V more) coexist with them. With `train.loss_chunk_size` these
terms cover one chunk only. Under autocast, matmuls also save bf16 copies of their weights (2 bytes
per matmul weight). Activation checkpointing of every block keeps only each block's input (R d)
plus one block recomputed at a time (Korthikanti's full recomputation, 2 s b h L in 16-bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.metrics.flops import matmul_params

if TYPE_CHECKING:
    from tokenmill.model.config import ModelConfig

GIB = 1024**3
SAFETY_FRACTION = 0.10  # keep 10% of the card free: allocator fragmentation, temporary buffers
RESERVED_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces: outside PyTorch's allocator statistics
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, both fp32 (torch.optim.AdamW keeps states in the param dtype)


@dataclass(frozen=True)
class MemoryMode:
    """Bytes per element for one precision recipe."""

    name: str
    weight: int  # stored parameters
    grad: int  # parameter gradients (same dtype as the parameters)
    activation: int  # tensors saved inside blocks
    residual: int  # the residual stream (fp32 even under autocast: fp32 embeddings + fp32 residual adds)
    weight_copy: int  # autocast's low-precision copy of each matmul weight, saved for backward (0 = none)


MODES: dict[str, MemoryMode] = {
    "fp32": MemoryMode("fp32", weight=4, grad=4, activation=4, residual=4, weight_copy=0),
    # fp32 master weights and grads, bf16 compute (tokenmill.precision: autocast, SPEC T4).
    "bf16-mixed": MemoryMode("bf16-mixed", weight=4, grad=4, activation=2, residual=4, weight_copy=2),
}


def static_bytes(n_params: int, mode: MemoryMode, optimizer_bytes: int = ADAMW_STATE_BYTES) -> dict[str, int]:
    """Weights, gradients and optimizer state: exactly parameters x bytes per parameter."""
    out = {"weights": n_params * mode.weight, "gradients": n_params * mode.grad,
           "optimizer": n_params * optimizer_bytes}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"]
    return out


def block_bytes_per_token(cfg: ModelConfig, mode: MemoryMode, seq_len: int) -> int:
    """Bytes one block saves for backward per token (see the module docstring for each term)."""
    a, r = mode.activation, mode.residual
    d, hd = cfg.d_model, cfg.resolved_head_dim()
    q, kv, f = cfg.n_heads * hd, cfg.kv_heads() * hd, cfg.ffn_width()
    attn = r * d + a * d + a * (q + 2 * kv) + a * q
    if cfg.qk_norm:
        attn += a * (q + kv)  # the per-head RMSNorm keeps its inputs
    if cfg.attention == "eager":
        attn += a * cfg.n_heads * seq_len  # softmax output, saved for the A V backward
        if cfg.dropout > 0:
            attn += (1 + a) * cfg.n_heads * seq_len  # dropout mask and the dropped probabilities
    ffn = r * d + a * d + (4 if cfg.ffn == "swiglu" else 2) * a * f
    masks = 2 * d if cfg.dropout > 0 else 0
    return attn + ffn + masks


def activation_bytes(cfg: ModelConfig, mode: MemoryMode, micro_batch: int, seq_len: int,
                     checkpointing: bool = False, loss_chunk_size: int = 0) -> dict[str, int]:
    """Activation memory at the peak (start of backward) for one micro-batch of `micro_batch` sequences."""
    tokens = micro_batch * seq_len
    per_block = block_bytes_per_token(cfg, mode, seq_len)
    n = matmul_params(cfg)
    layer_weights = (n["attention"] + n["ffn"]) // cfg.n_layers
    if checkpointing:
        blocks = tokens * (cfg.n_layers * mode.residual * cfg.d_model + per_block)
        copies = mode.weight_copy * (layer_weights + n["head"])
    else:
        blocks = tokens * cfg.n_layers * per_block
        copies = mode.weight_copy * (n["attention"] + n["ffn"] + n["head"])
    loss_tokens = min(loss_chunk_size, tokens) if loss_chunk_size > 0 else tokens
    out = {
        "blocks": blocks,
        "final_norm": tokens * (mode.residual + mode.activation) * cfg.d_model,
        "logits": loss_tokens * cfg.vocab_size * 4,  # fp32 log-probs saved by cross-entropy
        "loss_backward": loss_tokens * cfg.vocab_size * 4 * 2,  # their gradient + the logits' gradient
        "weight_copies": copies,
    }
    out["total"] = sum(out.values())
    return out


def usable_bytes(memory_gib: float) -> int:
    """What we let a plan use: the card minus RESERVED_GIB, minus SAFETY_FRACTION of the rest."""
    return int((memory_gib - RESERVED_GIB) * (1 - SAFETY_FRACTION) * GIB)


def max_micro_batch(cfg: ModelConfig, mode: MemoryMode, n_params: int, seq_len: int, memory_gib: float,
                    checkpointing: bool = False, loss_chunk_size: int = 0, limit: int = 1 << 16) -> int:
    """Largest micro-batch (sequences) whose static + activation bytes fit `usable_bytes`; 0 if none."""
    budget = usable_bytes(memory_gib) - static_bytes(n_params, mode)["total"]

    def fits(b: int) -> bool:
        return activation_bytes(cfg, mode, b, seq_len, checkpointing, loss_chunk_size)["total"] <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi) (or hi beyond the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

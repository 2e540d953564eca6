"""Training memory model for one GPU: static state (weights, gradients, optimizer) and activations.

Static bytes are exact: parameters x bytes per parameter. Activations start from the per-tensor
accounting of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), section 4.1: a GPT block saves s b h (34 + 5 a s / h) bytes in 16-bit. We count
the tensors that tokenmill's blocks really save for backward (tests/test_memory.py checks the count
against `torch.autograd.graph.saved_tensors_hooks` on CPU, in fp32 and under bf16 autocast):

per token and layer (A = activation bytes: 2 bf16 / 4 fp32; R = 4, the residual stream, which stays
fp32 under autocast; d = d_model, q = n_heads x d_head, kv = n_kv_heads x d_head, f = FFN width):
  norm feeding k linears   R d (input) + stats (rmsnorm 4, layernorm 8) [+ R d: RMSNorm keeps its fp32
                           normalised x for the weight's gradient] + the linears' input: in fp32 one
                           shared 4 d; under autocast every linear casts it again, k x A d (k = 3 for
                           q/k/v, 2 for swiglu's gate/up, 1 for mlp's up and for the head)
  attention  norm(3) + A (q + 2 kv) (SDPA inputs; GQA shrinks k, v) + A q (output = o_proj input)
             + 4 n_heads (fp32 log-sum-exp of flash/SDPA: no s^2 score matrix)
             [QK-norm: (4 + A)(q + kv) + 4 (n_heads + n_kv_heads): fp32 input copy, normalised x, rstd]
             [`eager` instead of the SDPA inputs: 3 A q (q, k and v expanded to n_heads) + the fp32
             softmax 4 n_heads s + A n_heads s for the probabilities A V consumes (autocast or dropout)]
  FFN        norm(2 swiglu / 1 mlp) + 4 A f (swiglu: gate, up, silu(gate), product) or 2 A f (mlp:
             activation input and output)
  dropout    1 byte per element per mask when dropout > 0 (Korthikanti's 2 s b h; eager: + (1 + A)
             n_heads s for the attention-probability mask and dropped copy)
With A = R = 2, MHA, mlp 4d, layernorm and no autocast casts this is Korthikanti's 34 h (32 h + 2 h of
dropout masks) plus stats; their 5 a s score term applies to `eager` only.

Outside the blocks: final norm(1), the int64 token ids (16 bytes per token) and the loss, by
`train.loss_impl` (`loss_bytes`; N tokens, vocab V):
  torch    fp32 log-probs, 4 N V, saved for backward (the logits term B S V 4); at the start of backward
           the gradients of the log-probs and of the logits (2 x 4 N V more) coexist with them;
  chunked  the same for one chunk of `train.loss_chunk_size` tokens (each chunk's logits are recomputed);
  liger    (Liger-Kernel, arXiv:2410.10989) computes the gradients of h and W during forward, chunk by chunk:
           they stay until backward (A N d + 4 V d, the weight gradient accumulated in fp32) and one chunk of
           logits, sized by the kernel to about N d elements (chunk = next_pow2(N / ceil(V / d))), is live;
  cce      (cut cross-entropy, arXiv:2411.09009) saves only the fp32 log-sum-exp (4 N); its blockwise
           recomputation in backward lives in on-chip memory.
Under autocast, matmuls also save bf16 copies of their weights (2 bytes per matmul weight; autocast
caches one cast per weight per forward). Activation checkpointing of every block keeps only each
block's input (R d) plus one block recomputed at a time (Korthikanti's full recomputation).
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
    # fp32 master weights and grads, bf16 compute (tokenmill.train.precision: autocast).
    "bf16-mixed": MemoryMode("bf16-mixed", weight=4, grad=4, activation=2, residual=4, weight_copy=2),
}


def static_bytes(n_params: int, mode: MemoryMode, optimizer_bytes: int = ADAMW_STATE_BYTES) -> dict[str, int]:
    """Weights, gradients and optimizer state: exactly parameters x bytes per parameter."""
    out = {
        "weights": n_params * mode.weight,
        "gradients": n_params * mode.grad,
        "optimizer": n_params * optimizer_bytes,
    }
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"]
    return out


def norm_bytes_per_token(cfg: ModelConfig, mode: MemoryMode, consumers: int) -> int:
    """Bytes saved around one residual-stream norm whose output feeds `consumers` linears."""
    r, d = mode.residual, cfg.d_model
    rms = cfg.norm == "rmsnorm"
    out = r * d + (4 if rms else 8)  # input and rstd (layernorm: mean and rstd)
    if rms:
        out += r * d  # the normalised x, kept by the multiply with the weight
    autocast = mode.weight_copy > 0
    return out + (consumers if autocast else 1) * mode.activation * d


def block_bytes_per_token(cfg: ModelConfig, mode: MemoryMode, seq_len: int) -> int:
    """Bytes one block saves for backward per token (see the module docstring for each term)."""
    a = mode.activation
    hd, nq, nkv = cfg.resolved_head_dim(), cfg.n_heads, cfg.kv_heads()
    q, kv, f = nq * hd, nkv * hd, cfg.ffn_width()
    attn = norm_bytes_per_token(cfg, mode, 3) + a * q  # + attention output (= o_proj input)
    if cfg.qk_norm:
        attn += (4 + a) * (q + kv) + 4 * (nq + nkv)
    if cfg.attention == "eager":
        # q and k, v expanded to n_heads; the fp32 softmax (CUDA autocast runs softmax in fp32) and the
        # probabilities A V consumes: their low-precision copy under autocast, or with dropout the
        # 1-byte mask (CUDA; the CPU kernel keeps a float mask) and the dropped copy.
        attn += 3 * a * q + 4 * nq * seq_len
        if cfg.dropout > 0:
            attn += (1 + a) * nq * seq_len
        elif mode.weight_copy:
            attn += a * nq * seq_len
    else:
        attn += a * (q + 2 * kv) + 4 * nq  # kernel inputs (GQA: k, v not expanded) and fp32 log-sum-exp
    if cfg.ffn == "swiglu":
        ffn = norm_bytes_per_token(cfg, mode, 2) + 4 * a * f
    else:
        ffn = norm_bytes_per_token(cfg, mode, 1) + 2 * a * f
    masks = 2 * cfg.d_model if cfg.dropout > 0 else 0
    return attn + ffn + masks


def loss_bytes(
    cfg: ModelConfig, mode: MemoryMode, tokens: int, loss_impl: str = "torch", loss_chunk_size: int = 0
) -> dict[str, int]:
    """Bytes the output head + loss keep at the start of backward for `tokens` tokens (module docstring).

    "logits": what forward saves or keeps live for the loss; "loss_backward": gradients that exist before
    the backward of the blocks begins. `loss_chunk_size` is the chunk of loss_impl=chunked.
    """
    v, d = cfg.vocab_size, cfg.d_model
    if loss_impl in ("torch", "chunked"):
        n = min(loss_chunk_size, tokens) if loss_impl == "chunked" and loss_chunk_size > 0 else tokens
        return {"logits": n * v * 4, "loss_backward": n * v * 4 * 2}
    if loss_impl == "liger":
        chunks = -(-v // d)  # Liger's inc_factor: ceil(V / d)
        chunk = min(1 << max(0, (-(-tokens // chunks) - 1).bit_length()), tokens)  # next power of two, at most N
        return {"logits": chunk * v * mode.activation, "loss_backward": tokens * d * mode.activation + v * d * 4}
    if loss_impl == "cce":
        return {"logits": tokens * 4, "loss_backward": 0}
    raise ValueError(f"unknown loss implementation {loss_impl!r}")


def activation_bytes(
    cfg: ModelConfig,
    mode: MemoryMode,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = False,
    loss_chunk_size: int = 0,
    loss_impl: str | None = None,
) -> dict[str, int]:
    """Activation memory at the peak (start of backward) for one micro-batch of `micro_batch` sequences.

    `loss_impl` None means the model's own loss: chunked when `loss_chunk_size` > 0, else torch.
    """
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
    if loss_impl is None:
        loss_impl = "chunked" if loss_chunk_size > 0 else "torch"
    out = {
        "blocks": blocks,
        "final_norm": tokens * norm_bytes_per_token(cfg, mode, 1),
        "token_ids": tokens * 16,  # int64 inputs (embedding backward) and targets (cross-entropy backward)
        **loss_bytes(cfg, mode, tokens, loss_impl, loss_chunk_size),
        "weight_copies": copies,
    }
    out["total"] = sum(out.values())
    return out


def usable_bytes(memory_gib: float) -> int:
    """What we let a plan use: the card minus RESERVED_GIB, minus SAFETY_FRACTION of the rest."""
    return int((memory_gib - RESERVED_GIB) * (1 - SAFETY_FRACTION) * GIB)


def max_micro_batch(
    cfg: ModelConfig,
    mode: MemoryMode,
    n_params: int,
    seq_len: int,
    memory_gib: float,
    checkpointing: bool = False,
    loss_chunk_size: int = 0,
    limit: int = 1 << 16,
    loss_impl: str | None = None,
) -> int:
    """Largest micro-batch (sequences) whose static + activation bytes fit `usable_bytes`; 0 if none."""
    budget = usable_bytes(memory_gib) - static_bytes(n_params, mode)["total"]

    def fits(b: int) -> bool:
        return activation_bytes(cfg, mode, b, seq_len, checkpointing, loss_chunk_size, loss_impl)["total"] <= budget

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

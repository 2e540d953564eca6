"""A nanoGPT-equivalent GPT and training step, the outside reference of benchmarks/step_overhead.py.

Written after karpathy/nanoGPT's model.py and train.py (MIT licence), in this file's own words, so the
benchmark measures tokenmill against what a researcher would run side by side: pre-LayerNorm blocks (with
biases), causal self-attention with one fused q/k/v projection and `scaled_dot_product_attention(is_causal=True)`,
a 4x MLP with exact GELU, learned positions, the head tied to the token embedding, fused AdamW with decay on
matrices only, and nanoGPT's step: autocast context, forward, backward, clip, step, zero_grad(set_to_none).
With `bias=True` it has exactly the parameters of tokenmill's `gpt2` bundle at the same size (the benchmark
checks the counts), so both sides compute the same FLOPs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    max_seq_len: int


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_heads = shape.n_heads
        self.c_attn = nn.Linear(shape.d_model, 3 * shape.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, d))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.c_fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.c_proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(idx (B, T), targets (B, T)) -> mean cross-entropy, as nanoGPT's `model(X, Y)` in training."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.max_seq_len, shape.d_model)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                # GPT-2's scaled init of the residual projections (Radford et al. 2019, section 2.3)
                std = 0.02 / (2 * shape.n_layers) ** 0.5 if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, d)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def build_optimizer(model: GPT, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """nanoGPT's `configure_optimizers`: decay every parameter of dimension >= 2, nothing else; fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def autocast_context(precision: str) -> contextlib.AbstractContextManager:
    """nanoGPT's `ctx`: bf16 autocast, or nothing in fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: contextlib.AbstractContextManager,
    window: torch.Tensor,
    grad_clip: float,
) -> torch.Tensor:
    """One nanoGPT iteration without gradient accumulation; returns the loss (no host sync here)."""
    with ctx:
        loss = model(window[:, :-1], window[:, 1:])
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

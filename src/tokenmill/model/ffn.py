"""Feed-forward layers and activations, chosen by name through `FFNS` and `ACTIVATIONS`.

- `mlp`: down(act(up(x))), hidden = ffn_mult x d (GPT-2: 4x, GELU-tanh).
- `swiglu`: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202), hidden = 2/3 of 4d rounded up to
  `multiple_of` or an explicit `ffn_hidden` (Llama); the gate always uses SiLU.
Module names follow Hugging Face Llama (gate_proj, up_proj, down_proj) so weights convert by renaming only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.config import ModelConfig


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al. 2021, "Primer", arXiv:2109.08668): sparse like ReLU, smooth at 0; HF calls it relu2."""
    return F.relu(x).square()


# The keys are ACTIVATION_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU (Hendrycks & Gimpel 2016)
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's tanh approximation ("gelu_new" in HF)
    "silu": F.silu,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01
    "relu2": relu_squared,
}


class MLP(nn.Module):
    """Two-layer MLP: (B, T, d) -> up (B, T, hidden) -> activation -> down (B, T, d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_width()
        self.act = ACTIVATIONS[cfg.activation]
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class SwiGLU(nn.Module):
    """Gated FFN: down(silu(gate(x)) * up(x)); three matrices of d x hidden."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_width()
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# The keys are FFN_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
FFNS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "swiglu": SwiGLU,
}

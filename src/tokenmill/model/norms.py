"""Normalisation layers, chosen by name through `NORMS`.

Every entry is a constructor `(dim, eps) -> nn.Module` whose parameters are named `weight` (and `bias`
for `layernorm`), so state-dict keys stay `*.weight` / `*.bias` for every choice (Hugging Face GPT-2 and
Llama load without renaming). Parameters are created empty-valued; `Transformer.init_weights()` sets them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, arXiv:1910.07467): x / sqrt(mean(x^2) + eps) * weight.

    The statistics are computed in fp32 whatever the input dtype (as Hugging Face Llama does), because a
    bf16 mean of squares loses most of its mantissa on wide residual streams.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        # keep the input dtype: fp32 master weights under bf16 autocast would otherwise promote q/k to fp32
        return normed * self.weight.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def _layernorm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, bias=True)


def _layernorm_nobias(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, bias=False)


# The keys are NORM_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "layernorm": _layernorm,  # GPT-2: LayerNorm with weight and bias
    "layernorm_nobias": _layernorm_nobias,  # LayerNorm without bias (OLMo-style)
    "rmsnorm": RMSNorm,  # Llama
}


def build_norm(name: str, dim: int, eps: float) -> nn.Module:
    """A norm layer by registry name."""
    return NORMS[name](dim, eps)

"""Initialisation schemes, chosen by name through `INITS`; applied only by `Transformer.init_weights()`.

A scheme answers three questions; `init_weights()` asks them for every parameter:
- `linear_std(role, fan_in, fan_out, cfg)`: std of the normal init of a linear weight, by its role
  (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, head);
- `embedding_std(cfg)`: std of the token (and learned position) tables;
- `residual_alpha(cfg)`: the constant multiplying the residual (skip) stream in every block (1 except DeepNet).

Schemes:
- `normal` (GPT-2 / nanoGPT): std = init_std; the projections that write into the residual stream
  (o_proj, down_proj) get std / sqrt(2 * n_layers) so the stream's variance does not grow with depth
  (GPT-2 paper, Radford et al. 2019, section 2.3).
- `fan_in`: std = 1 / sqrt(fan_in) (LeCun normal), residual projections also / sqrt(2 * n_layers).
- `deepnet`: DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", arXiv:2203.00555,
  Table 1, decoder-only row with N layers): x_{l+1} = Norm(alpha * x_l + G(x_l)) with alpha = (2N)^(1/4),
  and Xavier-normal init (std = gain * sqrt(2 / (fan_in + fan_out))) with gain beta = (8N)^(-1/4) for the
  value, output and FFN projections, gain 1 for query and key. DeepNorm is a post-norm scheme, so ModelConfig
  requires norm_position=post with it. The paper does not fix the embedding init; we use init_std, and an
  untied head gets std d^-1/2 (as the paper's reference code, microsoft/torchscale, does).
"""

from __future__ import annotations

import math

from tokenmill.model.config import ModelConfig

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # linears whose output is added to the residual stream


class NormalInit:
    """std = init_std; residual projections / sqrt(2 * n_layers)."""

    def linear_std(self, role: str, fan_in: int, fan_out: int, cfg: ModelConfig) -> float:
        scale = 1.0 / math.sqrt(2 * cfg.n_layers) if role in RESIDUAL_PROJECTIONS else 1.0
        return cfg.init_std * scale

    def embedding_std(self, cfg: ModelConfig) -> float:
        return cfg.init_std

    def residual_alpha(self, cfg: ModelConfig) -> float:
        return 1.0


class FanInInit(NormalInit):
    """std = 1 / sqrt(fan_in); residual projections / sqrt(2 * n_layers)."""

    def linear_std(self, role: str, fan_in: int, fan_out: int, cfg: ModelConfig) -> float:
        scale = 1.0 / math.sqrt(2 * cfg.n_layers) if role in RESIDUAL_PROJECTIONS else 1.0
        return scale / math.sqrt(fan_in)


def deepnet_alpha(n_layers: int) -> float:
    """DeepNorm residual multiplier for an N-layer decoder: (2N)^(1/4) (arXiv:2203.00555, Table 1)."""
    return (2 * n_layers) ** 0.25


def deepnet_beta(n_layers: int) -> float:
    """DeepNorm init gain for v/o/FFN weights of an N-layer decoder: (8N)^(-1/4) (arXiv:2203.00555, Table 1)."""
    return (8 * n_layers) ** -0.25


class DeepNetInit(NormalInit):
    """Xavier normal with gain beta on v/o/FFN (1 on q/k); residual stream scaled by alpha in every block."""

    BETA_ROLES = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def linear_std(self, role: str, fan_in: int, fan_out: int, cfg: ModelConfig) -> float:
        if role == "head":
            return cfg.d_model**-0.5
        gain = deepnet_beta(cfg.n_layers) if role in self.BETA_ROLES else 1.0
        return gain * math.sqrt(2.0 / (fan_in + fan_out))  # torch.nn.init.xavier_normal_

    def residual_alpha(self, cfg: ModelConfig) -> float:
        return deepnet_alpha(cfg.n_layers)


# The keys are INIT_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
INITS: dict[str, type[NormalInit]] = {
    "normal": NormalInit,
    "fan_in": FanInInit,
    "deepnet": DeepNetInit,
}

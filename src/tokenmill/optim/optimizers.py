"""Optimizer registry: `OPTIMIZERS[name](model, optim_cfg, lr, lr_scale) -> torch.optim.Optimizer`.

Every builder uses the parameter roles of `param_groups.py` (no decay on norms, biases, embeddings unless
`optim.decay_embeddings` / `optim.decay_norms_biases`), so all optimizers agree on which parameters decay. Every
returned optimizer's `state_dict()` holds only tensors and primitives (loadable with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokenmill.errors import UserError
from tokenmill.optim.config import OptimConfig
from tokenmill.optim.param_groups import (
    MUON_ROLES,
    build_param_groups,
    decay_switches,
    decays,
    named_trainable,
    parameter_roles,
)
from tokenmill.optim.recipe import role_lrs
from tokenmill.parallel.wrappers import unwrap


def scaled_lr(lr: float, global_batch_sequences: int, enabled: bool) -> float:
    """lr x sqrt(global batch in sequences) when enabled (square-root scaling keeps the
    update's noise scale constant as the batch grows: Krizhevsky 2014 arXiv:1404.5997, Malladi et al. 2022
    arXiv:2205.10287 for Adam)."""
    if not enabled:
        return lr
    if global_batch_sequences <= 0:
        raise UserError(f"sqrt LR scaling needs a positive global batch, got {global_batch_sequences} sequences")
    return lr * math.sqrt(global_batch_sequences)


def model_width(model: nn.Module) -> int:
    """Residual width d of a (possibly wrapped) model: its config's d_model, else its widest embedding's dim."""
    plain = unwrap(model)
    cfg = getattr(plain, "cfg", None)
    if cfg is not None and hasattr(cfg, "d_model"):
        return int(cfg.d_model)
    dims = [m.embedding_dim for m in plain.modules() if isinstance(m, nn.Embedding)]
    return max(dims) if dims else 0


def _params_on_device_kind(model: nn.Module) -> set[str]:
    return {p.device.type for p in model.parameters()}


def build_adamw(model: nn.Module, cfg: OptimConfig, lr: float, lr_scale: float) -> torch.optim.Optimizer:
    """torch AdamW; fused kernel when asked and the device/dtype supports it (CUDA, and CPU in recent torch),
    else the multi-tensor (foreach) path. Both compute the same update (tested to 1e-6)."""
    lrs = {role: value * lr_scale for role, value in role_lrs(cfg, lr, model_width(model)).items()}
    groups = build_param_groups(model, cfg.weight_decay, role_lrs=lrs, lr=lr * lr_scale, **decay_switches(cfg))
    kwargs: dict[str, Any] = dict(lr=lr * lr_scale, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass  # this device or dtype has no fused kernel: fall through to foreach
    foreach = "meta" not in _params_on_device_kind(model)
    return torch.optim.AdamW(groups, foreach=foreach, **kwargs)


def build_adafactor(model: nn.Module, cfg: OptimConfig, lr: float, lr_scale: float) -> torch.optim.Optimizer:
    """torch Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) with stochastic rounding for bf16 params.

    `lr` caps Adafactor's relative step size; its second-moment decay follows step^-0.8 (torch default)."""
    from tokenmill.optim.adafactor import StochasticAdafactor

    groups = build_param_groups(model, cfg.weight_decay, **decay_switches(cfg))
    return StochasticAdafactor(groups, lr=lr * lr_scale, seed=cfg.stochastic_rounding_seed)


def build_adamw8bit(model: nn.Module, cfg: OptimConfig, lr: float, lr_scale: float) -> torch.optim.Optimizer:
    """bitsandbytes AdamW8bit (Dettmers et al. 2022, arXiv:2110.02861): block-wise 8-bit optimizer state."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError("optim.name=adamw8bit needs bitsandbytes: pip install 'tokenmill[bnb]'") from exc
    groups = build_param_groups(model, cfg.weight_decay, **decay_switches(cfg))
    return bnb.optim.AdamW8bit(groups, lr=lr * lr_scale, betas=tuple(cfg.betas), eps=cfg.eps)


def build_muon(model: nn.Module, cfg: OptimConfig, lr: float, lr_scale: float) -> torch.optim.Optimizer:
    """Muon (lr = optim.muon_lr) for hidden matrices, AdamW (lr = optim.lr) for embeddings, head, norms and
    biases (each role at its `role_lrs` LR); one optimizer whose groups carry `kind` and `roles`. AdamW groups
    come first, so `get_last_lr()[0]` follows an AdamW LR as with every other optimizer."""
    from tokenmill.optim.muon import MuonWithAdamW

    roles = parameter_roles(model)
    params = named_trainable(model)
    lrs = role_lrs(cfg, lr, model_width(model))
    adamw = dict(betas=tuple(cfg.betas), eps=cfg.eps)
    # one group per (kind, decay, lr); a group's roles share its LR
    buckets: dict[tuple[str, bool, float], tuple[list[str], list[nn.Parameter]]] = {}
    for name, p in params.items():
        kind = "muon" if roles[name] in MUON_ROLES and p.ndim == 2 else "adamw"
        group_lr = cfg.muon_lr if kind == "muon" else lrs[roles[name]]
        names, ps = buckets.setdefault((kind, decays(roles[name], **decay_switches(cfg)), group_lr), ([], []))
        names.append(name)
        ps.append(p)
    groups = []
    # AdamW first, then decay before no_decay; within those, the order roles were first seen
    for (kind, decay, group_lr), (names, ps) in sorted(
        buckets.items(), key=lambda kv: (kv[0][0] != "adamw", not kv[0][1])
    ):
        group: dict[str, Any] = {"params": ps, "names": names, "kind": kind, "group": "decay" if decay else "no_decay"}
        group["roles"] = sorted({roles[n] for n in names})
        if kind == "muon":
            group.update(
                lr=group_lr * lr_scale,
                momentum=cfg.muon_momentum,
                weight_decay=cfg.muon_weight_decay if decay else 0.0,
            )
        else:
            group.update(lr=group_lr * lr_scale, weight_decay=cfg.weight_decay if decay else 0.0, **adamw)
        groups.append(group)
    fused = cfg.fused and all(p.device.type in ("cuda", "cpu") for p in params.values())
    return MuonWithAdamW(groups, adamw_options={"fused": True} if fused else {})  # picks the Muon for the device


# The keys are OPTIMIZER_NAMES in optim/config.py, the names config validation accepts (a test keeps them equal).
OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig, float, float], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "adafactor": build_adafactor,
    "muon": build_muon,
    "adamw8bit": build_adamw8bit,
}


def build_optimizer(
    model: nn.Module, optim_cfg: OptimConfig, lr: float | None = None, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """Build the optimizer named by `optim_cfg.name` for `model` (plain or wrapped).

    `lr` replaces `optim.lr` (e.g. with `scaled_lr(...)`); `lr_scale` multiplies every group's LR, Muon's
    included - use it for sqrt batch scaling when Muon is on.
    """
    if optim_cfg.name not in OPTIMIZERS:
        raise UserError(f"optim.name={optim_cfg.name!r} is not an optimizer: choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[optim_cfg.name](model, optim_cfg, optim_cfg.lr if lr is None else lr, lr_scale)

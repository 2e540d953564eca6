"""Muon for hidden 2-D matrices plus AdamW for everything else, as ONE optimizer (one state_dict).

Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/) keeps SGD momentum per matrix and replaces the update by its
nearest semi-orthogonal matrix, computed by a few Newton-Schulz iterations of a quintic polynomial.
Embeddings, the output head, norms and biases are not hidden matrices and stay on AdamW (same source).

`torch.optim.Muon` (torch >= 2.9) is used for the matrix groups on accelerators; older torch and CPU parameters
get `FallbackMuon`, a line-for-line port of the same update (momentum as an EMA via `lerp`, Nesterov, Newton-Schulz,
decoupled weight decay, lr x sqrt(max(1, rows/cols))), tested against torch's where both exist. The port runs
Newton-Schulz in bf16 like torch's, or in fp32 on CPUs: most CPUs have no bf16 matrix units, so bf16 is ~17x slower
there (0.53 s vs 0.03 s for one 768 x 256 matrix, one thread), and fp32 keeps runs that should agree (gradient
accumulation, 2 processes vs 1) within fp32 rounding instead of bf16's.

`MuonWithAdamW` is a thin optimizer whose param groups carry `kind` = "muon" | "adamw"; it steps an inner
Muon and an inner AdamW that share its group dicts and its `state`, so LR schedulers, `state_dict()` and
`load_state_dict()` see one ordinary optimizer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

# Quintic coefficients tuned for the largest slope at zero (Keller Jordan's muon.py).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(
    grad: torch.Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix: U S V^T -> U S' V^T with S' roughly in [0.5, 1.5].

    X <- a X + (b A + c A^2) X with A = X X^T, after scaling X to Frobenius norm <= 1 (so every singular
    value is <= 1). Computed in `dtype` (bf16 like the reference); transposed so the Gram matrix is the small side.
    """
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


class FallbackMuon(torch.optim.Optimizer):
    """Muon for torch versions without `torch.optim.Muon`; same group keys and state (`momentum_buffer`)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"], self.ns_dtype)
                rows, cols = p.shape[:2]
                scale = (
                    0.2 * math.sqrt(max(rows, cols))
                    if group["adjust_lr_fn"] == "match_rms_adamw"
                    else math.sqrt(max(1, rows / cols))
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)
        return loss


def muon_class(device_type: str = "cuda") -> Callable[..., torch.optim.Optimizer]:
    """The port above with fp32 Newton-Schulz for CPU parameters; else torch's Muon when this torch ships one."""
    if device_type == "cpu":
        return functools.partial(FallbackMuon, ns_dtype=torch.float32)
    return getattr(torch.optim, "Muon", FallbackMuon)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: groups with `kind="muon"` step with Muon, `kind="adamw"` with AdamW.

    `groups` are ordinary param-group dicts, each with a `kind`; Muon groups may hold only 2-D parameters.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        muon_cls: Callable[..., torch.optim.Optimizer] | None = None,
        adamw_options: dict[str, Any] | None = None,
    ) -> None:
        muon_groups = [g for g in groups if g.get("kind") == "muon"]
        adamw_groups = [g for g in groups if g.get("kind") == "adamw"]
        if len(muon_groups) + len(adamw_groups) != len(groups):
            raise ValueError("every group needs kind='muon' or kind='adamw'")
        devices = {p.device.type for g in muon_groups for p in g["params"]}
        self._muon_cls = muon_cls or muon_class("cpu" if devices == {"cpu"} else "cuda")
        self._adamw_options = adamw_options or {}
        # The inner optimizers fill each group dict with their defaults in place; we then adopt the same dicts.
        inner = self._build_inner(muon_groups, adamw_groups)
        super().__init__(groups, defaults={})  # the caller's order (e.g. AdamW first, so lr[0] is optim.lr)
        self._inner = inner
        self._link()

    def _build_inner(
        self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]]
    ) -> list[torch.optim.Optimizer]:
        inner: list[torch.optim.Optimizer] = []
        if muon_groups:
            inner.append(self._muon_cls(muon_groups))
        if adamw_groups:
            inner.append(torch.optim.AdamW(adamw_groups, **self._adamw_options))
        return inner

    def _link(self) -> None:
        """Point each inner optimizer at this optimizer's group dicts (by kind) and its state."""
        for opt in self._inner:
            kind = "adamw" if isinstance(opt, torch.optim.AdamW) else "muon"
            opt.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Loading replaces the group dicts and the state mapping: re-link the inner optimizers afterwards.
        super().load_state_dict(state_dict)
        self._link()

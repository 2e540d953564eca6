"""Adafactor (torch.optim.Adafactor) with stochastic rounding for bf16 parameters.

Why: bf16 has 8 mantissa bits, so an update smaller than half a unit in the last place of a weight is
rounded away every step and pure-bf16 training stalls. Doing the update in fp32 and rounding the result
*stochastically* back to bf16 keeps it unbiased in expectation: E[round(x)] = x (Gupta et al. 2015,
"Deep Learning with Limited Numerical Precision", arXiv:1502.02551; Zamirai et al. 2020, "Revisiting BFloat16
Training", arXiv:2010.06192). The optimizer state of a bf16 parameter is kept in fp32.

Rounding: bf16 is the top 16 bits of an fp32. Adding a uniform random integer in [0, 2^16) to the fp32 bit
pattern and truncating the low 16 bits rounds up with probability (discarded bits) / 2^16, i.e. exactly in
proportion to the distance to the lower neighbour.

Determinism: the random bits come from one `torch.Generator` per device seeded from `seed`; its state is
part of `state_dict()`, so a resumed run draws the same bits as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

_LOW_BITS = 1 << 16  # bf16 keeps the high 16 bits of an fp32 word


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up with probability equal to the fraction of the bf16 gap below it.

    Non-finite values pass through deterministically-rounded (adding noise could turn a large finite value
    into inf only if it already sits at the top of the range, which a plain cast also does).
    """
    x = x.float().contiguous()
    noise = torch.randint(0, _LOW_BITS, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    bits = x.view(torch.int32) + noise  # carries into the mantissa exactly when rounding up
    bits = bits & -_LOW_BITS  # clear the 16 low bits: -65536 == 0xFFFF0000 as int32
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are already zero
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


class StochasticAdafactor(torch.optim.Adafactor):
    """`torch.optim.Adafactor`; bf16 parameters are updated in fp32 and stochastically rounded back."""

    def __init__(self, params: Any, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        # Swap each bf16 parameter (and its grad) for an fp32 copy, step, then round back.
        swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.dtype == torch.bfloat16:
                    grad = p.grad
                    p.grad = None
                    p.data = p.data.float()
                    p.grad = grad.float()
                    swapped.append((p, grad))
        try:
            loss = super().step(closure)
        finally:
            for p, grad in swapped:
                rounded = stochastic_round_to_bf16(p.data, self._generator(p.device))
                p.grad = None
                p.data = rounded
                p.grad = grad
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["stochastic_rounding"] = {
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rounding = state_dict.pop("stochastic_rounding", None)
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype on load; bf16 parameters keep fp32 state here.
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            if p.dtype == torch.bfloat16:
                for key, value in saved.items():
                    if key != "step" and torch.is_tensor(value):
                        self.state[p][key] = value.to(device=p.device)
        if rounding is not None:
            self.seed = int(rounding["seed"])
            self._generators = {}
            for key, gen_state in rounding["generators"].items():
                gen = torch.Generator(device=key)
                gen.set_state(gen_state)
                self._generators[key] = gen

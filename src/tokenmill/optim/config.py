"""The `optim` and `schedule` config sections, with the names of every optimizer and LR schedule.

The defaults are tokenmill's training recipe, measured by benchmarks/recipe.py (docs/performance.md, "Recipe"):
Muon for hidden matrices with AdamW for everything else, and a warmup-stable-decay (trapezoid) schedule with a
linear cooldown over the last 20% of steps to 0.1x. Every preset inherits them; a preset may override.

The names live here, so validating a config imports no torch; `OPTIMIZERS` in optim/optimizers.py and
`SCHEDULES` in optim/schedules.py must have exactly these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

OPTIMIZER_NAMES = ("adamw", "adafactor", "muon", "adamw8bit")
SCHEDULE_NAMES = ("cosine", "wsd", "wsd-linear", "infinite", "constant", "linear")


@dataclass
class OptimConfig:
    name: str = opt(
        "muon", "optimizer (OPTIMIZERS): muon (Muon on hidden matrices, AdamW on the rest), adamw, adafactor, adamw8bit"
    )
    lr: float = opt(3e-3, "peak learning rate (AdamW; with muon: of embeddings, head, norms and biases)")
    betas: list[float] = opt([0.9, 0.95], "Adam betas (beta1, beta2)")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay on matrices")
    decay_embeddings: bool = opt(False, "also decay embeddings (token/position tables; a tied head is one)")
    decay_norms_biases: bool = opt(False, "also decay norm gains and biases")
    decay_norms_biases_embeddings: bool = opt(False, "old key: true = decay_embeddings and decay_norms_biases")
    fused: bool = opt(True, "use the fused AdamW kernel where the device has one")
    lr_sqrt_batch_scaling: bool = opt(False, "lr = lr x sqrt(global batch in sequences)")
    muon_lr: float = opt(0.02, "Muon learning rate for 2-D matrices")
    muon_momentum: float = opt(0.95, "Muon momentum")
    muon_weight_decay: float = opt(0.0, "Muon decoupled weight decay on matrices (0 as in Keller Jordan's Muon)")
    embedding_lr: float = opt(0.0, "AdamW LR of embedding tables (a tied head included); 0 = optim.lr")
    head_lr: float = opt(0.0, "AdamW LR of an untied output head; 0 = optim.lr")
    scalar_lr: float = opt(0.0, "AdamW LR of norm gains and biases; 0 = optim.lr")
    lr_reference_width: int = opt(
        0, "scale the AdamW LRs of hidden matrices and the head by this / model width (muP-style); 0 = off"
    )
    stochastic_rounding_seed: int = opt(0, "adafactor: seed of the bf16 stochastic-rounding random bits")

    def validate(self) -> None:
        require_choice("optim.name", self.name, OPTIMIZER_NAMES)
        require_positive(self, "optim", "lr", "eps", "muon_lr")
        require_positive(self, "optim", "weight_decay", "muon_weight_decay", allow_zero=True)
        require_positive(self, "optim", "embedding_lr", "head_lr", "scalar_lr", "lr_reference_width", allow_zero=True)
        require(0 <= self.muon_momentum < 1, "optim.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1), e.g. [0.9, 0.95]",
        )


@dataclass
class ScheduleConfig:
    name: str = opt(
        "wsd-linear", "LR schedule (SCHEDULES): wsd-linear (trapezoid), wsd, cosine, infinite, constant, linear"
    )
    warmup_steps: int = opt(100, "linear warmup steps from 0 to the peak LR")
    warmup_tokens: int = opt(0, "warmup length in training tokens; when > 0 it replaces warmup_steps")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of the peak (cosine, linear, wsd, infinite anneal)")
    decay_ratio: float = opt(0.2, "wsd: fraction of steps spent in the final decay")
    constant_lr_ratio: float = opt(0.5, "infinite: LR of the constant phase as a fraction of the peak")
    min_cooldown_tokens: int = opt(0, "infinite: cooldown lasts max(this / tokens_per_step, 0.7 x total_steps)")
    anneal_steps: int = opt(0, "infinite: final anneal from the constant LR to min_lr_ratio; 0 = none")

    def validate(self) -> None:
        require_choice("schedule.name", self.name, SCHEDULE_NAMES)
        require_positive(
            self, "schedule", "warmup_steps", "warmup_tokens", "min_cooldown_tokens", "anneal_steps", allow_zero=True
        )
        require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(0 < self.decay_ratio <= 1, "schedule.decay_ratio", self.decay_ratio, "must be in (0, 1]")
        require(
            0 <= self.constant_lr_ratio <= 1, "schedule.constant_lr_ratio", self.constant_lr_ratio, "must be in [0, 1]"
        )

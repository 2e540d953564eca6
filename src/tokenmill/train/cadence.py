"""When the loop logs, evaluates, checkpoints and gathers per-layer statistics: one rule, in steps or tokens.

Each interval is given in optimizer steps (`*.interval_steps`) or in training tokens (`*.interval_tokens`, which
replaces the step count when > 0 and is converted with the batch plan's tokens per step), and then multiplied by
`train.step_cadence`. The loop and the StepMonitor both ask the one `Cadence` built here, so gradient statistics
are queued exactly on the steps that get logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.config import Config
    from tokenmill.train.batching import BatchPlan

# log.per_layer_interval=0 (auto): every 10th log step below 1B parameters. The update/param ratio keeps a copy of
# every weight until the optimizer step, which a 1B+ model cannot spare on every tenth log step.
AUTO_PER_LAYER_INTERVAL = 10
AUTO_PER_LAYER_MAX_PARAMS = 1_000_000_000


def interval_in_steps(steps: int, tokens: int, tokens_per_step: int, scale: float) -> int:
    """Optimizer steps between two events: `tokens` / tokens per step when `tokens` > 0, else `steps`, times
    `scale`, rounded to the nearest step but at least 1; 0 (never) stays 0."""
    base = tokens / tokens_per_step if tokens > 0 else steps
    return max(1, round(base * scale)) if base > 0 else 0


@dataclass(frozen=True)
class Cadence:
    """Steps between events; `eval_every` / `checkpoint_every` 0 = only the final one, `per_layer_every` counts
    log steps (0 = never). The last step is always a log step; the final eval and save belong to the tear-down."""

    log_every: int
    eval_every: int
    checkpoint_every: int
    per_layer_every: int
    total_steps: int

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def is_eval_step(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0 and step < self.total_steps

    def is_checkpoint_step(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < self.total_steps

    def is_per_layer_step(self, step: int) -> bool:
        """Per-layer gradient norms and update ratios: every `per_layer_every`-th periodic log step."""
        return bool(self.per_layer_every) and step % (self.log_every * self.per_layer_every) == 0


def build_cadence(cfg: Config, plan: BatchPlan, n_params: int) -> Cadence:
    """The run's cadence from the log, eval and checkpoint sections, the batch plan and the model size."""
    scale, per_step = cfg.train.step_cadence, plan.tokens_per_step
    log_every = interval_in_steps(cfg.log.interval_steps, cfg.log.interval_tokens, per_step, scale)
    per_layer = 0
    if cfg.log.per_layer_grad_norms:
        per_layer = cfg.log.per_layer_interval or (
            AUTO_PER_LAYER_INTERVAL if n_params < AUTO_PER_LAYER_MAX_PARAMS else 0
        )
    return Cadence(
        log_every=max(1, log_every),
        eval_every=interval_in_steps(cfg.eval.interval_steps, cfg.eval.interval_tokens, per_step, scale),
        checkpoint_every=interval_in_steps(
            cfg.checkpoint.interval_steps, cfg.checkpoint.interval_tokens, per_step, scale
        ),
        per_layer_every=per_layer,
        total_steps=plan.total_steps,
    )

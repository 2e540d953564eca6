"""The `log` config section: cadence and metric sinks."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require_choice, require_positive


@dataclass
class LogConfig:
    interval_steps: int = opt(10, "log metrics every N steps (scaled by train.step_cadence)")
    interval_tokens: int = opt(
        0, "log every N training tokens (scaled by train.step_cadence); when > 0 it replaces interval_steps"
    )
    jsonl: bool = opt(True, "write every event to <out_dir>/metrics.jsonl")
    tensorboard: bool = opt(False, "write TensorBoard events to <out_dir>/tb")
    wandb: str = opt("off", "Weights & Biases: off, online or offline")
    wandb_project: str = opt("tokenmill", "W&B project name")
    per_layer_grad_norms: bool = opt(
        True, "log each block's gradient norm and update/param ratio (every log.per_layer_interval-th log step)"
    )
    per_layer_interval: int = opt(
        0,
        "per-layer statistics every N-th log step; 0 = auto: every 10th log step for "
        "models under 1B parameters, never from 1B up (each costs a copy of the weights)",
    )
    progress_bar: bool = opt(True, "show a progress bar with ETA on the console")

    def validate(self) -> None:
        require_positive(self, "log", "interval_steps")
        require_positive(self, "log", "interval_tokens", "per_layer_interval", allow_zero=True)
        require_choice("log.wandb", self.wandb, ("off", "online", "offline"))

"""The `log` config section: cadence and metric sinks."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require_choice, require_positive


@dataclass
class LogConfig:
    interval_steps: int = opt(10, "log metrics every N steps (scaled by train.step_cadence)")
    jsonl: bool = opt(True, "write every event to <out_dir>/metrics.jsonl")
    tensorboard: bool = opt(False, "write TensorBoard events to <out_dir>/tb")
    wandb: str = opt("off", "Weights & Biases: off, online or offline")
    wandb_project: str = opt("tokenmill", "W&B project name")
    per_layer_grad_norms: bool = opt(False, "log each block's gradient norm and update/param ratio")
    progress_bar: bool = opt(True, "show a progress bar with ETA on the console")

    def validate(self) -> None:
        require_positive(self, "log", "interval_steps")
        require_choice("log.wandb", self.wandb, ("off", "online", "offline"))

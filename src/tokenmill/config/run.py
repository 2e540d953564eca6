"""The root run config: one field per section, each section's dataclass imported from the package that owns it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from tokenmill.checkpoint.config import CheckpointConfig
from tokenmill.data.config import DataConfig
from tokenmill.finetune.config import RLConfig
from tokenmill.metrics.config import LogConfig
from tokenmill.model.config import ModelConfig
from tokenmill.optim.config import OptimConfig, ScheduleConfig
from tokenmill.parallel.config import ParallelConfig
from tokenmill.train.config import EvalConfig, StabilityConfig, TrainConfig


@dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    stability: StabilityConfig = dataclasses.field(default_factory=StabilityConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Block YAML, one key per line with its help as a comment; loads back to the same config."""
        lines = []
        for section in dataclasses.fields(self):
            lines.append(f"{section.name}:")
            value = getattr(self, section.name)
            for f in dataclasses.fields(value):
                text = _yaml_value(getattr(value, f.name))
                lines.append(f"  {f.name}: {text}  # {f.metadata.get('help', '')}".rstrip())
        return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    """One value as inline YAML (flow style for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()

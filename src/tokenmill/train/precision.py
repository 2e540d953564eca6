"""Numeric precision of a run: autocast context and loss scaler for fp32, bf16 and fp16."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tokenmill.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` = bf16 where the hardware computes it natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass
class Precision:
    """Mixed precision keeps fp32 master weights; only the forward runs in the low dtype."""

    name: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.name])

    def make_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling to keep small gradients representable; other dtypes get a disabled scaler."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

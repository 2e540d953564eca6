"""The decoder model: config, components (norms, positions, FFNs, attention, init) and the Transformer.

Light on purpose: importing `tokenmill.model.config` must not import torch, so the heavy names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_meta": "build",
    "build_model": "build",
    "param_counts": "build",
    "ModelConfig": "config",
    "Block": "transformer",
    "Transformer": "transformer",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tokenmill.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tokenmill.model' has no attribute {name!r}")

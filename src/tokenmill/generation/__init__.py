"""Text generation: the one KV-cache engine (`Generator`) and what requests ask and get (`SamplingParams`,
`Completion`, `StreamDelta`). Names load on first use, so importing this package does no torch work."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Generator": "engine",
    "Request": "request",
    "SamplingParams": "params",
    "Completion": "params",
    "StreamDelta": "params",
    "generate": "api",
}
__all__ = ["Completion", "Generator", "Request", "SamplingParams", "StreamDelta", "generate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tokenmill.generation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tokenmill.generation' has no attribute {name!r}")

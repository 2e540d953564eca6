"""tokenmill: pretrain dense decoder-only language models, from a laptop CPU to multi-node GPUs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public helpers imported on first use, so `import tokenmill` does no torch work.
_LAZY = {
    "load_model": "tokenmill.api",
    "create_model": "tokenmill.api",
    "load_tokenizer": "tokenmill.api",
    "generate": "tokenmill.generation.api",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")

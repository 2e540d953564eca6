"""Run configuration: typed sections, presets, YAML files and dotted overrides. Imports no torch.

The names below load on first use: each section's `config.py` imports `tokenmill.config.fields`, and the
root `Config` imports every section, so an eager import here would be circular.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOADING = (
    "all_keys",
    "apply_override",
    "build_section",
    "coerce",
    "config_from_dict",
    "deep_merge",
    "field_help",
    "load_config",
    "load_file",
    "load_preset",
    "parse_override",
    "preset_names",
    "split_overrides",
)
_LAZY = {"Config": "run", **dict.fromkeys(_LOADING, "loading")}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tokenmill.config.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tokenmill.config' has no attribute {name!r}")

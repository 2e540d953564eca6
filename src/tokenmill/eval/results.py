"""Where evaluation results go: a JSON file under `<run>/eval/` and an event in the run's metrics sinks.

Results are appended to the run's history and never rewind it: metrics.jsonl gets one more line, TensorBoard one
more event file, and W&B continues the run's own id (a new one is never written over the training run's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EVAL_DIR = "eval"


def results_path(run_dir: str | Path, step: int, what: str) -> Path:
    """`<run>/eval/step_00000300-<what>.json`: one file per checkpoint and evaluation."""
    return Path(run_dir) / EVAL_DIR / f"step_{step:08d}-{what}.json"


def save_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically (values JSON cannot hold become strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # NumPy scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def log_to_run(run_dir: str | Path, config: dict[str, Any], step: int, metrics: dict[str, Any], kind: str) -> None:
    """Append one `kind` event at `step` to the sinks the run's `log` section enables (no console)."""
    from tokenmill.metrics.sinks import JSONL_NAME, TB_DIR, JsonlSink, MultiSink, TensorBoardSink, WandbSink

    run_dir = Path(run_dir)
    log = config.get("log") or {}
    sinks: list[Any] = []
    if log.get("jsonl", True):
        sinks.append(JsonlSink(run_dir / JSONL_NAME))
    if log.get("tensorboard", False):
        sinks.append(TensorBoardSink(run_dir / TB_DIR))
    if log.get("wandb", "off") != "off":
        sinks.append(WandbSink(run_dir, log.get("wandb_project", "tokenmill"), log["wandb"], config, resume=True))
    with MultiSink(sinks) as multi:
        multi.log(step, metrics, kind=kind)

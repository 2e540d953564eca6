"""Hand-written metrics.jsonl files shaped like the training loop's (event kinds and fields as metrics/sinks.py
and metrics/monitor.py write them), so the analysis tests know every number they should get back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

T0 = 1_700_000_000.0  # first event time of every fixture run
TOKENS_PER_STEP = 100


def config(step: int = 0, lr: float = 1e-3, out_dir: str = "runs/x", t: float = T0) -> dict[str, Any]:
    return {
        "kind": "config",
        "step": step,
        "time": t,
        "model": {"n_layers": 2, "norm": "rmsnorm"},
        "optim": {"lr": lr, "betas": [0.9, 0.95]},
        "train": {"seed": 1, "out_dir": out_dir},
    }


def startup(step: int = 0, t: float = T0, params: int = 12345) -> dict[str, Any]:
    return {
        "kind": "startup",
        "step": step,
        "time": t,
        "model": {"params_total": params},
        "training": {"tokens_per_step": TOKENS_PER_STEP, "total_steps": 10},
    }


def train(step: int, loss: float, t: float | None = None, **extra: Any) -> dict[str, Any]:
    event = {
        "kind": "train",
        "step": step,
        "time": T0 + step if t is None else t,
        "loss": loss,
        "lr": 1e-4 * step,
        "tokens_per_s": 1000.0 + step,
        "mfu": None,
        "step_time_s": 0.1,
        "grad_norm": 1.0 + 0.1 * step,
        "tokens_seen": step * TOKENS_PER_STEP,
        "total_steps": 10,
        "skipped": 0,
    }
    event.update(extra)
    return event


def evaluation(step: int, loss: float, t: float | None = None) -> dict[str, Any]:
    return {
        "kind": "eval",
        "step": step,
        "time": T0 + step + 0.5 if t is None else t,
        "loss": loss,
        "ppl": 2.0**loss,
        "bpb": loss / 2,
        "tokens": 64,
        "seconds": 0.1,
    }


def checkpoint(step: int, t: float, reason: str = "interval") -> dict[str, Any]:
    return {"kind": "checkpoint", "step": step, "time": t, "path": f"checkpoints/step_{step}", "reason": reason}


def summary(step: int, status: str = "completed", t: float | None = None, skipped: int = 0) -> dict[str, Any]:
    return {
        "kind": "summary",
        "step": step,
        "time": T0 + step + 0.9 if t is None else t,
        "status": status,
        "steps": step,
        "tokens_seen": step * TOKENS_PER_STEP,
        "skipped_steps": skipped,
        "final_loss": None,
        "eval": {},
    }


LOSSES = [5.0, 4.0, 3.5, 3.6, 3.0, 2.9, 3.1, 2.6, 2.85, 3.3]


def completed_events(losses: list[float] = LOSSES, lr: float = 1e-3, out_dir: str = "runs/x") -> list[dict]:
    """A 10-step run logging every step, evaluating at 5 and 10, checkpointing at the end."""
    events = [config(lr=lr, out_dir=out_dir), startup()]
    for step, loss in enumerate(losses, start=1):
        events.append(train(step, loss))
        if step % 5 == 0:
            events.append(evaluation(step, loss + 0.25))
    events.append(checkpoint(10, T0 + 10.7, "final"))
    events.append(summary(10))
    return events


def write_run(folder: Path, events: list[dict[str, Any]], tail: str = "") -> Path:
    """metrics.jsonl in `folder` (made), one JSON line per event, then `tail` verbatim (e.g. a torn line)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(event) + "\n" for event in events) + tail
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    return folder

"""The run's heartbeat, `RUN/control/status.json`, and how a reader tells whether a run is alive.

Rank 0 writes it through `StatusSink`, driven by the loop's metric events: at start-up, at each log step (step,
tokens, loss, lr, tokens/s, ETA), at each checkpoint and with the final status; each write replaces the file
atomically. A reader on the run's host asks the OS whether the process still exists and was created when the
heartbeat says (so a recycled pid does not pass for the run); on another host only the heartbeat's age can tell.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from tokenmill.checkpoint.folder import atomic_write_json
from tokenmill.jobs.control import CONTROL_DIR, STATUS_NAME, control_dir

RUNNING = "running"  # the heartbeat's state until the summary event gives the final one
ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"  # what a reader concludes about a run still marked running
TRAIN_FIELDS = ("loss", "lr", "tokens_seen", "tokens_per_s", "eta_s", "total_steps")  # copied from a log step
FRESH_MIN_S = 120.0  # a remote heartbeat counts as fresh when younger than this...
FRESH_INTERVALS = 3  # ...or than this many of its own intervals between log steps, whichever is longer
SAME_PROCESS_S = 1.0  # slack between the creation time the heartbeat records and the one the OS reports
SEARCH_DEPTH = 2  # `find_runs(ROOT)` looks at ROOT, its sub-folders and theirs (runs/team/experiment)


class StatusSink:
    """Writes the heartbeat; a metrics sink (`log(step, metrics, kind)`, `close()`) the loop adds on rank 0."""

    def __init__(self, run_dir: str | Path, started_at: float | None = None, total_steps: int | None = None) -> None:
        self.path = control_dir(run_dir) / STATUS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.status: dict[str, Any] = {
            "state": RUNNING,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_created": psutil.Process().create_time(),
            "started_at": started_at or time.time(),
            "updated_at": None,
            "heartbeat_s": None,
            "step": 0,
            "total_steps": total_steps,
            "tokens_seen": None,
            "loss": None,
            "lr": None,
            "tokens_per_s": None,
            "eta_s": None,
            "last_checkpoint": None,
        }
        self._last_log_step_time: float | None = None
        self._warned = False

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if kind == "train":
            self.status.update({key: finite(metrics.get(key)) for key in TRAIN_FIELDS if key in metrics})
            now = time.time()
            if self._last_log_step_time is not None:
                self.status["heartbeat_s"] = now - self._last_log_step_time
            self._last_log_step_time = now
        elif kind in ("checkpoint", "resume"):
            self.status["last_checkpoint"] = metrics.get("path")
        elif kind == "summary":
            self.status["state"] = metrics.get("status")
            self.status["tokens_seen"] = metrics.get("tokens_seen", self.status["tokens_seen"])
            if metrics.get("final_loss") is not None:
                self.status["loss"] = finite(metrics["final_loss"])
        elif kind != "startup":
            return
        self.status["step"] = step
        self.write()

    def write(self) -> None:
        """Replace status.json; a failure warns once and training goes on (the heartbeat only observes)."""
        self.status["updated_at"] = time.time()
        try:
            atomic_write_json(self.path, self.status)
        except OSError as err:
            if not self._warned:
                warnings.warn(
                    f"could not write {self.path} ({err.strerror or err}); `tokenmill control` will not "
                    f"see this run's progress",
                    stacklevel=2,
                )
                self._warned = True

    def close(self) -> None:
        """Nothing to release: every write is complete."""


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number (a diverging loss) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's heartbeat, or None when it has none (not a run, or one that never started) or it is unreadable."""
    try:
        status = json.loads((control_dir(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def process_alive(pid: Any, created: Any) -> bool:
    """True when process `pid` exists on this host, is not a zombie, and was created at `created` (unix time)."""
    try:
        process = psutil.Process(int(pid))
        return (
            process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - float(created)) <= SAME_PROCESS_S
        )
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False
    except psutil.AccessDenied:  # another user's process: it exists, its creation time is unreadable
        return True


def liveness(status: Mapping[str, Any], now: float | None = None) -> str:
    """`alive`, `dead` or `unknown` for a run whose heartbeat says running; else the final state it recorded
    (completed, stopped, aborted, diverged, nonfinite, failed, interrupted)."""
    if status.get("state") != RUNNING:
        return str(status.get("state"))
    if status.get("host") == socket.gethostname():
        return ALIVE if process_alive(status.get("pid"), status.get("process_created")) else DEAD
    age = (now or time.time()) - float(status.get("updated_at") or 0.0)
    fresh = max(FRESH_MIN_S, FRESH_INTERVALS * float(status.get("heartbeat_s") or 0.0))
    return ALIVE if age <= fresh else UNKNOWN


def eta_now(status: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds left: the heartbeat's ETA less the time since it was written."""
    eta, updated = status.get("eta_s"), status.get("updated_at")
    if eta is None or updated is None:
        return None
    return max(0.0, float(eta) - ((now or time.time()) - float(updated)))


def find_runs(root: str | Path) -> list[Path]:
    """Run folders (those holding control/status.json) at `root` and up to SEARCH_DEPTH levels below it."""
    root = Path(root)
    found = []
    for depth in range(SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth + [CONTROL_DIR, STATUS_NAME])
        found += [path.parent.parent for path in root.glob(pattern)]
    return sorted(set(found))

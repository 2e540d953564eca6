"""A run folder as its history: the resolved config and the events of `metrics.jsonl`, as the run really went.

The file is the source of truth (richer than TensorBoard): each training session starts with a `config`
event; a session that resumed from a checkpoint at step N logs a `resume` event, and the steps after N that an
earlier session logged before it was killed are replayed, so their old events are dropped here (the training
sink does the same when it resumes; doing it again makes any file read correctly). A session without a
`resume` event is a fresh run in the same file, and only its events count. Lines that are not JSON events (a
line cut short by a kill, a damaged file) are skipped with a warning; the rest is read.

Importing this module imports no torch, so `tokenmill logs ...` starts fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenmill.errors import UserError
from tokenmill.metrics.sinks import JSONL_NAME

# Fields every event carries next to its metrics.
EVENT_FIELDS = ("kind", "step", "time")
# Checkpoint folders hold the resolved config too (read when an old metrics.jsonl has no config event).
CHECKPOINT_CONFIGS = "checkpoints/step_*/config.yaml"
EVENT_START = '{"kind": '  # how the training sink starts every line


@dataclass(frozen=True)
class Event:
    """One line of metrics.jsonl; `elapsed_s` is the active time since the run started (the gaps between
    a killed session and its resume do not count)."""

    kind: str
    step: int
    time: float
    elapsed_s: float
    data: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@dataclass
class Run:
    """A run's effective history. `sessions` is the number of training processes it took (1 + resumes)."""

    path: Path
    name: str
    config: dict[str, Any]
    events: list[Event]
    resumes: list[Event] = field(default_factory=list)
    sessions: int = 1
    wall_time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def last(self, kind: str) -> Event | None:
        found = self.of_kind(kind)
        return found[-1] if found else None

    @property
    def summary_event(self) -> Event | None:
        """The `summary` the last session wrote at its end (None: still running, or killed)."""
        return self.last("summary")

    @property
    def startup(self) -> Mapping[str, Any]:
        event = self.last("startup")
        return event.data if event else {}

    @property
    def last_step(self) -> int:
        return max((e.step for e in self.events), default=0)

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens of one optimizer step: the start-up plan, else what the train events imply."""
        planned = self.startup.get("training", {}).get("tokens_per_step")
        if planned:
            return int(planned)
        for event in self.of_kind("train"):
            if event.step and event.get("tokens_seen"):
                return int(event.get("tokens_seen")) // event.step
        return None

    def tokens_at(self, event: Event) -> float | None:
        """Tokens seen when `event` was logged (train events carry it; others follow from their step)."""
        if event.get("tokens_seen") is not None:
            return float(event.get("tokens_seen"))
        per_step = self.tokens_per_step
        return None if per_step is None else float(event.step * per_step)


def load_run(path: str | Path) -> Run:
    """Read a run folder (or its metrics.jsonl); a folder that is not a run or holds no events is a UserError."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        file, folder = path, path.parent
    elif path.is_dir():
        file, folder = path / JSONL_NAME, path
        if not file.is_file():
            hint = "pass a run's train.out_dir, e.g. runs/demo"
            for pattern in ("*", "*/*"):  # a folder of runs (runs/), or an ablation (OUT/<cell>/seed<S>)
                inside = list(path.glob(f"{pattern}/{JSONL_NAME}"))
                if inside:
                    hint = f"it holds {len(inside)} run{'s' * (len(inside) > 1)}: pass {path / pattern}"
                    break
            raise UserError(f"{path} is not a run folder: it has no {JSONL_NAME} ({hint})")
    elif path.exists():
        raise UserError(f"{path} is neither a run folder nor a {JSONL_NAME} file")
    else:
        raise UserError(f"{path} does not exist: pass a run folder (a run's train.out_dir, e.g. runs/demo)")
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror or err}") from err
    if not text.strip():
        raise UserError(f"{file} is empty: the run has not logged anything yet")
    raw, bad_lines = _parse_lines(text)
    warnings = []
    if bad_lines:
        shown = ", ".join(str(n) for n in bad_lines[:5]) + (", ..." if len(bad_lines) > 5 else "")
        warnings.append(
            f"{file}: skipped {len(bad_lines)} unreadable line{'s' * (len(bad_lines) > 1)} "
            f"(line {shown}); read the rest"
        )
    if not raw:
        raise UserError(f"{file} holds no readable event: is it a tokenmill metrics.jsonl?")
    events, resumes, sessions, wall = _history(raw)
    config = _config_of(events, folder)
    return Run(
        path=folder,
        name=folder.resolve().name,
        config=config,
        events=events,
        resumes=resumes,
        sessions=sessions,
        wall_time_s=wall,
        warnings=warnings,
    )


def _parse_lines(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """JSON objects with a kind and an integer step, and the numbers of the lines that are not."""
    events, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = _salvage(line)
            bad.append(number)
        if not _is_event(event):
            if not bad or bad[-1] != number:
                bad.append(number)
            continue
        events.append(event)
    return events, bad


def _is_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("kind"), str)
        and isinstance(event.get("step", 0), int)
        and isinstance(event.get("time", 0.0), (int, float))
    )


def _salvage(line: str) -> Any:
    """The event after a torn one on the same line: a killed run's cut line, then the resumed run's first event."""
    start = line.rfind(EVENT_START, 1)
    if start < 0:
        return None
    try:
        return json.loads(line[start:])
    except ValueError:
        return None


def _sessions(raw: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Split the file at each `config` event: one list per training process."""
    current: list[dict[str, Any]] = []
    for event in raw:
        if event["kind"] == "config" and current:
            yield current
            current = []
        current.append(event)
    if current:
        yield current


def _history(raw: list[dict[str, Any]]) -> tuple[list[Event], list[Event], int, float]:
    """(kept events, resume events, sessions, active seconds): rewound events dropped, fresh restarts reset.

    Resuming at step N rewinds everything an earlier session logged after N (its metrics, and its resume,
    config or summary events too when a resume went back past them).
    """
    kept: list[tuple[dict[str, Any], int]] = []  # (event, session index)
    for index, events in enumerate(_sessions(raw)):
        resume = next((e for e in events if e["kind"] == "resume"), None)
        # a fresh run (no resume): what an older run logged in this file is not part of it
        step = None if resume is None else resume.get("step", 0)
        kept = [] if step is None else [(e, s) for e, s in kept if e.get("step", 0) <= step]
        kept += [(e, index) for e in events]
    # active time: each session's span from its first to its last kept event, sessions laid end to end
    spans: dict[int, tuple[float, float]] = {}
    for event, session in kept:
        t = float(event.get("time", 0.0))
        first, last = spans.get(session, (t, t))
        spans[session] = (min(first, t), max(last, t))
    offsets, total = {}, 0.0
    for session in sorted(spans):
        first, last = spans[session]
        offsets[session] = total - first
        total += last - first
    out = [
        Event(
            kind=e["kind"],
            step=int(e.get("step", 0)),
            time=float(e.get("time", 0.0)),
            elapsed_s=float(e.get("time", 0.0)) + offsets[s],
            data={k: v for k, v in e.items() if k not in EVENT_FIELDS},
        )
        for e, s in kept
    ]
    return out, [e for e in out if e.kind == "resume"], len(spans), total


def _config_of(events: list[Event], folder: Path) -> dict[str, Any]:
    """The resolved config of the latest session, else the newest checkpoint's config.yaml, else {}."""
    for event in reversed(events):
        if event.kind == "config":
            return dict(event.data)
    for path in sorted(folder.glob(CHECKPOINT_CONFIGS), reverse=True):
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            return loaded
    return {}


def load_runs(paths: list[str] | list[Path]) -> list[Run]:
    """Several runs with distinct names (the folder name, widened with its parents where two are alike)."""
    runs = [load_run(p) for p in paths]
    names = [_unique_name(run, runs) for run in runs]
    for run, name in zip(runs, names, strict=True):
        run.name = name
    return runs


def _unique_name(run: Run, runs: list[Run]) -> str:
    parts = run.path.resolve().parts
    for depth in range(1, len(parts) + 1):
        name = "/".join(parts[-depth:])
        others = ["/".join(other.path.resolve().parts[-depth:]) for other in runs if other is not run]
        if name not in others:
            return name
    return str(run.path)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"norm": "rmsnorm"}} -> {"model.norm": "rmsnorm"}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def finite(value: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None

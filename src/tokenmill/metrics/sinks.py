"""Where metrics go: console, JSONL, TensorBoard, Weights & Biases - one protocol, so observability is pluggable.

A sink has `log(step, metrics, kind)` and `close()`. Kinds: config, startup, resume, train, eval, sample
({"prompt", "text"} or {"samples": {prompt: text}}), checkpoint, nonfinite, diverged, warning ({"message"}),
summary, eval_tasks ({"task/metric": score}) and eval_source (loss, ppl, bpb over a data source). Ranks other
than 0 get a MultiSink with no sinks, so the loop never checks the rank. TensorBoard and W&B are imported only
when enabled.

A metrics file that cannot be written (full disk, read-only or vanished folder) is one UserError line naming
the path; MultiSink then drops that sink, so the run's closing summary still reaches the others.

Resuming at step N: metrics.jsonl keeps its events up to step N and continues in the same file;
TensorBoard purges events after N; W&B continues the same run id (stored in <out_dir>/wandb_id.txt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tokenmill.errors import UserError

if TYPE_CHECKING:
    from tokenmill.metrics.config import LogConfig

KINDS = (
    "config",
    "startup",
    "resume",
    "train",
    "eval",
    "sample",
    "checkpoint",
    "nonfinite",
    "diverged",
    "warning",
    "summary",
    "eval_tasks",
    "eval_source",
)
# events of these kinds logged after the resumed checkpoint's step are dropped when a run resumes
STEP_KINDS = ("train", "eval", "sample", "checkpoint", "nonfinite", "diverged", "eval_tasks")
# kinds whose numbers TensorBoard and W&B plot (eval_tasks: lm-eval scores "task/metric"; eval_source: loss/bpb)
PLOTTED_KINDS = ("train", "eval", "eval_tasks", "eval_source")
JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"
# What the sinks write under a run's out_dir (train/run_dir.py removes exactly these on --overwrite): JSONL
# (and its rewrite in progress), TensorBoard event files, W&B's run folders, logs and pointer, and the W&B id.
OUTPUTS = (
    JSONL_NAME,
    f".tmp-{JSONL_NAME}",
    f"{TB_DIR}/events.out.tfevents.*",
    "wandb/run-*",
    "wandb/offline-run-*",
    "wandb/latest-run",
    "wandb/debug.log",
    "wandb/debug-internal.log",
    WANDB_ID_FILE,
)

_CONSOLE: Any = None


def get_console() -> Any:
    """The one rich Console shared by the console sink and the progress bar (so lines print above the bar)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(highlight=False)
    return _CONSOLE


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError while writing metrics to `path` into one line that says what to do."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing metrics to {path}: free space, then continue with --resume "
                f"(checkpoints already written are intact)"
            ) from err
        raise UserError(
            f"cannot write metrics to {path}: {err.strerror or err}; make train.out_dir writable or choose another one"
        ) from err


class Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None: ...

    def close(self) -> None: ...


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and NumPy become numbers/lists, NaN/inf become null (strict JSON)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars (a host sync for GPU tensors)
        return to_jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries (what TensorBoard and W&B plot)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class MultiSink:
    """Fans every event out to several sinks; an empty MultiSink is the no-op sink of non-zero ranks.

    A sink that fails to write (UserError) is dropped before the error propagates: the others keep logging.
    """

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown metrics kind {kind!r}; expected one of {KINDS}")
        for sink in list(self.sinks):
            self._call(sink, sink.log, step, metrics, kind)

    def close(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, sink.close)

    def _call(self, sink: Sink, method: Any, *args: Any) -> None:
        try:
            method(*args)
        except UserError:
            self.sinks.remove(sink)
            with contextlib.suppress(UserError, OSError):
                sink.close()
            raise

    def __enter__(self) -> MultiSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# Console


def human(value: float, digits: int = 3) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _num(value: Any, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def format_train(step: int, m: Mapping[str, Any]) -> str:
    total = m.get("total_steps")
    parts = [f"step {step}/{total}" if total else f"step {step}", f"loss {_num(m.get('loss'), '.4f')}"]
    optional = [
        ("lr", lambda v: f"lr {v:.2e}"),
        ("tokens_per_s", lambda v: f"{human(v)} tok/s"),
        ("mfu", lambda v: f"mfu {100 * v:.1f}%"),
        ("step_time_s", lambda v: f"{1000 * v:.0f} ms/step"),
        ("grad_norm", lambda v: f"grad {v:.3f}"),
        ("mem_peak_gib", lambda v: f"mem {v:.1f} GiB"),
        ("eta_s", lambda v: f"eta {duration(v)}"),
    ]
    parts += [render(m[key]) for key, render in optional if m.get(key) is not None]
    return " | ".join(parts)


def samples(metrics: Mapping[str, Any]) -> dict[str, str]:
    """{prompt: text} from a sample event in either form."""
    if isinstance(metrics.get("samples"), Mapping):
        return {str(k): str(v) for k, v in metrics["samples"].items()}
    return {str(metrics.get("prompt", "")): str(metrics.get("text", ""))}


class ConsoleSink:
    """Compact human lines: one per train log step, eval, sample, checkpoint, problem and the summary."""

    def __init__(self, console: Any = None) -> None:
        self.console = console or get_console()

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        m = metrics
        if kind == "train":
            self.console.print(format_train(step, m), soft_wrap=True)  # one line; the terminal wraps it
        elif kind == "eval":
            extra = "".join(f" | {k} {v:.4f}" for k, v in m.items() if k != "loss" and isinstance(v, float))
            self.console.print(f"[bold]eval[/] step {step} | loss {_num(m.get('loss'), '.4f')}{extra}")
        elif kind in ("eval_tasks", "eval_source"):
            body = " | ".join(f"{k} {v:.4f}" for k, v in scalars(m).items())
            self.console.print(f"[bold]{kind.replace('_', ' ')}[/] step {step} | {body}")
        elif kind == "sample":
            from rich.markup import escape

            for prompt, text in samples(m).items():
                self.console.print(f"[dim]sample[/] step {step} | {escape(repr(prompt))} -> {escape(repr(text))}")
        elif kind == "checkpoint":
            self.console.print(
                f"[green]checkpoint[/] step {step} -> {m.get('path')}"
                + (f" ({m['reason']})" if m.get("reason") else "")
            )
        elif kind == "resume":
            self.console.print(f"[yellow]resumed[/] from {m.get('path')} at step {step}")
        elif kind in ("nonfinite", "diverged"):
            body = " | ".join(f"{k} {v}" for k, v in m.items())
            self.console.print(f"[red]{kind}[/] step {step} | {body}")
        elif kind == "warning":
            from rich.markup import escape

            self.console.print(f"[yellow]warning[/] step {step} | {escape(str(m.get('message')))}")
        elif kind == "summary":
            body = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
            self.console.print(f"[bold]done[/] step {step} | {body}")
        # Not printed: "config" (long; `tokenmill config show` prints it) and "startup" (the loop prints the
        # banner itself with Banner.print()).

    def close(self) -> None:
        """The console needs no closing."""


# ---------------------------------------------------------------------------------------------------
# JSONL


class JsonlSink:
    """One JSON object per event, `{"kind", "step", "time", ...metrics}`, flushed per line (survives a kill)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self._truncate_after(resume_step)
            self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _truncate_after(self, step: int) -> None:
        """Drop events a killed run logged after the checkpoint it resumes from, so the file reads as if the
        run had never stopped (the resumed run logs those steps again)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if not (event.get("kind") in STEP_KINDS and (event.get("step") or 0) > step):
                kept.append(line)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        event = {"kind": kind, "step": step, "time": round(time.time(), 3), **to_jsonable(dict(metrics))}
        with writing(self.path):
            self.handle.write(json.dumps(event, allow_nan=False) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if not self.handle.closed:
            with writing(self.path):
                self.handle.close()


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Events of a metrics.jsonl (optionally one kind), skipping a torn last line."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if kind is None or event.get("kind") == kind:
            events.append(event)
    return events


# ---------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardSink:
    """Scalars under train/ and eval/, text for config, start-up info, samples and the summary."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard is optional at run time

        self.log_dir = Path(log_dir)
        with writing(self.log_dir):
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        with writing(self.log_dir):  # the writer thread's errors surface at the next add or flush
            self._log(step, metrics, kind)

    def _log(self, step: int, metrics: Mapping[str, Any], kind: str) -> None:
        if kind in PLOTTED_KINDS:
            for key, value in scalars(metrics).items():
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        elif kind == "sample":
            for prompt, text in samples(metrics).items():
                self.writer.add_text(f"sample/{prompt}", text, step)
        elif kind in ("config", "startup", "summary"):
            rows = "\n".join(f"| {k} | {v} |" for k, v in _flatten(to_jsonable(dict(metrics))).items())
            self.writer.add_text(kind, f"| key | value |\n|---|---|\n{rows}", step)
        if kind != "train":  # train scalars are flushed by the writer's own timer
            self.writer.flush()

    def close(self) -> None:
        with writing(self.log_dir):
            self.writer.flush()
            self.writer.close()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run folder: reused when resuming (one W&B run across restarts), new otherwise."""
    path = run_dir / WANDB_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    with writing(path):
        path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """Logs to Weights & Biases online or offline; a resumed run continues the same W&B run id."""

    def __init__(self, run_dir: str | Path, project: str, mode: str, config: Any = None, resume: bool = False) -> None:
        try:
            import wandb  # lazy: optional dependency
        except ImportError as err:
            raise UserError(
                f"log.wandb={mode} needs the wandb package: pip install 'tokenmill[wandb]' (or set log.wandb=off)"
            ) from err
        self.wandb = wandb
        run_dir = Path(run_dir)
        self.run_id = wandb_run_id(run_dir, resume)
        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            id=self.run_id,
            resume="allow",
            mode=mode,
            config=to_jsonable(config.to_dict() if hasattr(config, "to_dict") else config or {}),
        )

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if kind in (*PLOTTED_KINDS, "nonfinite"):
            self.run.log({f"{kind}/{k}": v for k, v in scalars(metrics).items()}, step=step)
        elif kind == "sample":
            self.run.log({f"sample/{prompt}": text for prompt, text in samples(metrics).items()}, step=step)
        elif kind in ("config", "startup"):
            self.run.config.update({kind: to_jsonable(dict(metrics))}, allow_val_change=True)
        elif kind == "summary":
            self.run.summary.update(to_jsonable(dict(metrics)))

    def close(self) -> None:
        self.run.finish()


# ---------------------------------------------------------------------------------------------------


def build_sinks(
    log_cfg: LogConfig,
    run_dir: str | Path,
    rank: int = 0,
    *,
    config: Any = None,
    resume_step: int | None = None,
    console: bool = True,
) -> MultiSink:
    """The sinks `log_cfg` (the `log` section) asks for; no-ops off rank 0.

    `resume_step` (the step of the checkpoint being resumed, else None) keeps the JSONL, TensorBoard and
    W&B history continuous across restarts.
    """
    if rank != 0:
        return MultiSink()
    run_dir = Path(run_dir)
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [ConsoleSink()] if console else []
    try:
        if log_cfg.jsonl:
            sinks.append(JsonlSink(run_dir / JSONL_NAME, resume_step))
        if log_cfg.tensorboard:
            sinks.append(TensorBoardSink(run_dir / TB_DIR, None if resume_step is None else resume_step + 1))
        if log_cfg.wandb != "off":
            sinks.append(
                WandbSink(run_dir, log_cfg.wandb_project, log_cfg.wandb, config, resume=resume_step is not None)
            )
    except BaseException:
        for sink in sinks:  # close the ones already open; the first error is the one to report
            with contextlib.suppress(UserError, OSError):
                sink.close()
        raise
    return MultiSink(sinks)

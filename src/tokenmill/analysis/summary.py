"""What a run did, in one flat record: status, budget, losses with their steps, throughput, stability, resumes.

`summarize(run)` gives plain JSON values (the `--json` output and what `logs compare` and `ablate` tabulate);
`summary_rows` + `text_table` / `markdown_table` render one column per run. "Best" train loss is the lowest
mean of `BEST_WINDOW` consecutive logged losses (at the window's last step): unlike the minimum, one lucky
batch cannot set it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from tokenmill.analysis.runs import Run, finite
from tokenmill.metrics import sinks as metric_units

BEST_WINDOW = 5  # logged train losses averaged for the "best" train loss
INCOMPLETE = "incomplete"  # no summary event: the run is still going, or its process was killed


def summarize(run: Run) -> dict[str, Any]:
    """The summary record of one run (None where the run did not log the value)."""
    train = [e for e in run.of_kind("train") if finite(e.get("loss")) is not None]
    end = run.summary_event
    last_train = train[-1] if train else None
    out: dict[str, Any] = {
        "run": run.name,
        "path": str(run.path),
        "status": end.get("status", INCOMPLETE) if end else INCOMPLETE,
        "steps": run.last_step,
        "total_steps": last_train.get("total_steps") if last_train else None,
        "tokens": _tokens(run, end, last_train),
        "wall_time_s": run.wall_time_s,
        "sessions": run.sessions,
        "last_event_time": run.events[-1].time if run.events else None,
        "params": run.startup.get("model", {}).get("params_total"),
    }
    out.update(_train_losses(train))
    out.update(_evals(run))
    out["tokens_per_s"] = _median(train, "tokens_per_s")
    out["mfu"] = _median(train, "mfu")
    out["step_time_s"] = _median(train, "step_time_s")
    norm = _extreme(train, "grad_norm", max)
    out["max_grad_norm"], out["max_grad_norm_step"] = norm
    lrs = [v for v in (finite(e.get("lr")) for e in train) if v is not None]
    out["lr_min"], out["lr_max"] = (min(lrs), max(lrs)) if lrs else (None, None)
    out["skipped_steps"] = _skipped(run, end, last_train)
    out["nonfinite"] = [{"step": e.step, **e.data} for e in run.of_kind("nonfinite")]
    out["diverged"] = [{"step": e.step, **e.data} for e in run.of_kind("diverged")]
    out["resumes"] = [{"step": e.step, "path": e.get("path")} for e in run.resumes]
    return out


def _tokens(run: Run, end: Any, last_train: Any) -> int | None:
    if end is not None and end.get("tokens_seen") is not None:
        return int(end.get("tokens_seen"))
    if last_train is not None and last_train.get("tokens_seen") is not None:
        return int(last_train.get("tokens_seen"))
    per_step = run.tokens_per_step
    return None if per_step is None else run.last_step * per_step


def _train_losses(train: list[Any]) -> dict[str, Any]:
    if not train:
        return dict.fromkeys(
            ("final_loss", "final_loss_step", "min_loss", "min_loss_step", "best_loss", "best_loss_step")
        )
    losses = [float(e.get("loss")) for e in train]
    low = min(range(len(losses)), key=losses.__getitem__)
    out = {
        "final_loss": losses[-1],
        "final_loss_step": train[-1].step,
        "min_loss": losses[low],
        "min_loss_step": train[low].step,
        "best_loss": None,
        "best_loss_step": None,
    }
    # mean of the window ending at each log; the step is that window's last (fewer logs than a window: no best)
    means = {i: statistics.fmean(losses[i - BEST_WINDOW + 1 : i + 1]) for i in range(BEST_WINDOW - 1, len(losses))}
    if means:
        best = min(means, key=means.__getitem__)
        out.update(best_loss=means[best], best_loss_step=train[best].step)
    return out


def _evals(run: Run) -> dict[str, Any]:
    evals = [e for e in run.of_kind("eval") if finite(e.get("loss")) is not None]
    if not evals:
        return dict.fromkeys(
            ("eval_loss", "eval_ppl", "eval_bpb", "eval_step", "best_eval_loss", "best_eval_bpb", "best_eval_step")
        )
    last = evals[-1]
    best = min(evals, key=lambda e: e.get("loss"))
    return {
        "eval_loss": last.get("loss"),
        "eval_ppl": finite(last.get("ppl")),
        "eval_bpb": finite(last.get("bpb")),
        "eval_step": last.step,
        "best_eval_loss": best.get("loss"),
        "best_eval_bpb": finite(best.get("bpb")),
        "best_eval_step": best.step,
    }


def _median(events: list[Any], key: str) -> float | None:
    values = [v for v in (finite(e.get(key)) for e in events) if v is not None]
    return statistics.median(values) if values else None


def _extreme(events: list[Any], key: str, pick: Callable[..., Any]) -> tuple[float | None, int | None]:
    found = [(v, e.step) for e in events if (v := finite(e.get(key))) is not None]
    if not found:
        return None, None
    return pick(found, key=lambda pair: pair[0])


def _skipped(run: Run, end: Any, last_train: Any) -> int:
    """The loop's own count (restored from the checkpoint on resume, so replayed skips count once)."""
    for source in (end, last_train):
        if source is not None and isinstance(source.get("skipped_steps", source.get("skipped")), int):
            return int(source.get("skipped_steps", source.get("skipped")))
    return len(run.of_kind("nonfinite"))


# ---------------------------------------------------------------------------------------------------------
# rendering: one row per quantity, one column per run


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def human(value: float | None) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    return "-" if value is None else metric_units.human(value)


def duration(seconds: float | None) -> str:
    return "-" if seconds is None else metric_units.duration(seconds)


def _at(value: Any, step: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else f"{value:{fmt}} @{step}"


def _status(s: dict[str, Any], now: float) -> str:
    if s["status"] != INCOMPLETE:
        return s["status"]
    age = now - s["last_event_time"] if s["last_event_time"] else None
    return f"{INCOMPLETE} (running or killed; last event {duration(age)} ago)"


def _problems(s: dict[str, Any]) -> str:
    parts = []
    if s["nonfinite"]:
        parts.append("non-finite at step " + ", ".join(str(p["step"]) for p in s["nonfinite"]))
    for event in s["diverged"]:
        parts.append(f"diverged at step {event['step']}" + (f" ({event['reason']})" if event.get("reason") else ""))
    return "; ".join(parts) or "none"


def summary_rows(summaries: Sequence[dict[str, Any]], now: float | None = None) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) rows for the text and markdown tables."""
    now = time.time() if now is None else now
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("status", lambda s: _status(s, now)),
        ("steps", lambda s: f"{s['steps']}" + (f" / {s['total_steps']}" if s["total_steps"] else "")),
        ("tokens", lambda s: human(s["tokens"])),
        (
            "wall time",
            lambda s: duration(s["wall_time_s"]) + (f" ({s['sessions']} sessions)" if s["sessions"] > 1 else ""),
        ),
        ("parameters", lambda s: human(s["params"])),
        ("train loss final", lambda s: _at(s["final_loss"], s["final_loss_step"])),
        ("train loss min", lambda s: _at(s["min_loss"], s["min_loss_step"])),
        (f"train loss best ({BEST_WINDOW}-log mean)", lambda s: _at(s["best_loss"], s["best_loss_step"])),
        ("eval loss", lambda s: _at(s["eval_loss"], s["eval_step"])),
        ("eval ppl", lambda s: _num(s["eval_ppl"], ".2f")),
        ("eval bpb", lambda s: _num(s["eval_bpb"])),
        ("best eval loss", lambda s: _at(s["best_eval_loss"], s["best_eval_step"])),
        ("tokens/s (median)", lambda s: human(s["tokens_per_s"])),
        ("MFU (median)", lambda s: "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"),
        ("max grad norm", lambda s: _at(s["max_grad_norm"], s["max_grad_norm_step"], ".3f")),
        ("lr range", lambda s: "-" if s["lr_min"] is None else f"{s['lr_min']:.2e} .. {s['lr_max']:.2e}"),
        ("skipped steps", lambda s: str(s["skipped_steps"])),
        ("problems", _problems),
        ("resumes", lambda s: ", ".join(f"step {r['step']}" for r in s["resumes"]) or "none"),
    ]
    return [(label, [render(s) for s in summaries]) for label, render in rows]


def text_table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    """Aligned plain-text columns (no colour, so it pipes and diffs cleanly)."""
    table = [list(header)] + [[label, *cells] for label, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line([label, *cells]) for label, cells in rows)])

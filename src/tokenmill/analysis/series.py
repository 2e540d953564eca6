"""Named metrics as (x, y) series of a run: what `logs plot` draws and `logs compare` lines up step by step.

A metric is looked up by name in `METRICS` (add a metric by adding an entry). Per-block metrics
(`update_ratio`, `layer_grad_norm`) come from the `name/group` keys the step monitor logs, one series per
group (`tok_emb`, `blocks.0`, ...). The x axis is the step, the tokens seen (comparable across runs of different
batch sizes) or the active wall time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.analysis.runs import Event, Run, finite
from tokenmill.errors import UserError


@dataclass(frozen=True)
class Metric:
    kind: str  # event kind it is read from: train | eval
    key: str  # field of the event; for per-block metrics the prefix before "/"
    title: str
    unit: str
    per_block: bool = False
    scale: float = 1.0  # shown value = logged value * scale
    hint: str = ""  # why a run may not log it
    from_zero: bool = False  # a rate: the y axis starts at 0 so small wobbles do not look like collapses
    log_scale: bool = False  # spans orders of magnitude (blocks differ 100x): always a log y axis


METRICS: dict[str, Metric] = {
    "loss": Metric("train", "loss", "Train loss", "nats/token"),
    "eval_loss": Metric("eval", "loss", "Eval loss (held out)", "nats/token"),
    "eval_bpb": Metric("eval", "bpb", "Eval bits per byte", "bits/byte"),
    "lr": Metric("train", "lr", "Learning rate", "lr"),
    "tokens_per_s": Metric("train", "tokens_per_s", "Throughput", "tokens/s", from_zero=True),
    "step_time": Metric("train", "step_time_s", "Step time", "s", from_zero=True),
    "grad_norm": Metric("train", "grad_norm", "Gradient norm (before clipping)", "L2 norm"),
    "mfu": Metric(
        "train",
        "mfu",
        "Model FLOPs utilisation",
        "%",
        scale=100.0,
        hint="logged on GPUs whose peak FLOPS are known",
        from_zero=True,
    ),
    "update_ratio": Metric(
        "train",
        "update_ratio",
        "Update / parameter ratio per block",
        "|Δθ| / |θ|",
        per_block=True,
        hint="logged with per-layer gradient statistics on",
        log_scale=True,
    ),
    "layer_grad_norm": Metric(
        "train",
        "grad_norm",
        "Gradient norm per block",
        "L2 norm",
        per_block=True,
        hint="logged with per-layer gradient statistics on",
        log_scale=True,
    ),
}
X_AXES = {"steps": "optimizer step", "tokens": "tokens seen", "time": "active wall time"}  # name -> axis label


@dataclass
class Series:
    label: str  # the block for per-block metrics, else ""
    x: list[float]
    y: list[float]


def metric_named(name: str) -> Metric:
    if name not in METRICS:
        raise UserError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
    return METRICS[name]


def parse_metrics(text: str) -> list[str]:
    """`loss,eval_loss` -> ["loss", "eval_loss"], each checked against METRICS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--metrics needs at least one name: choose from {', '.join(METRICS)}")
    for name in names:
        metric_named(name)
    return list(dict.fromkeys(names))


def x_value(run: Run, event: Event, x: str) -> float | None:
    if x == "steps":
        return float(event.step)
    if x == "tokens":
        return run.tokens_at(event)
    if x == "time":
        return event.elapsed_s
    raise UserError(f"unknown x axis {x!r}: choose from {', '.join(X_AXES)}")


def series(run: Run, name: str, x: str = "steps") -> list[Series]:
    """The metric's series in `run` (several for per-block metrics; empty when the run never logged it)."""
    metric = metric_named(name)
    events = run.of_kind(metric.kind)
    keys = block_keys(events, metric.key) if metric.per_block else {"": metric.key}
    out = []
    for label, key in keys.items():
        xs, ys = [], []
        for event in events:
            value, at = finite(event.get(key)), x_value(run, event, x)
            if value is not None and at is not None:
                xs.append(at)
                ys.append(value * metric.scale)
        if ys:
            out.append(Series(label, xs, ys))
    return out


def block_keys(events: list[Event], prefix: str) -> dict[str, str]:
    """{group: "prefix/group"} for every group logged, embeddings first, then blocks by depth, then the rest."""
    groups = {key.split("/", 1)[1] for event in events for key in event.data if key.startswith(prefix + "/")}
    return {group: f"{prefix}/{group}" for group in sorted(groups, key=_depth_order)}


def _depth_order(group: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"blocks\.(\d+)", group)
    if match:
        return (1, int(match.group(1)), group)
    return (0 if "emb" in group else 2, 0, group)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (fewer at the start), so the curve never looks ahead."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def has_data(runs: list[Run], name: str) -> bool:
    return any(series(run, name) for run in runs)

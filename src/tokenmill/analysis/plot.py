"""Pictures of runs: one panel per metric with the runs overlaid, as PNG/SVG or as a text plot in the terminal.

matplotlib draws on a bare `Figure` with the Agg canvas (no pyplot, no display, no global figure state), and
saves without version strings (`metadata={"Software": None}`), so the same runs give the same file. matplotlib
and plotext are the optional `plot` extra, imported only here and only when a picture is asked for.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmill.analysis.runs import Run
from tokenmill.analysis.series import METRICS, X_AXES, Series, has_data, metric_named, series, smooth, x_value
from tokenmill.errors import UserError

PLOT_EXTRA = "pip install 'tokenmill[plot]'"
# Panels drawn when --metrics is not given (those with data in at least one run).
DEFAULT_METRICS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "update_ratio")
SAVE_METADATA = {".png": {"Software": None}, ".svg": {"Creator": None, "Date": None}}
SVG_HASH_SALT = "tokenmill"  # fixed salt for SVG element ids (random by default), so equal runs give equal files
# Run events drawn as vertical lines on every panel: kind -> (legend label, colour, line style).
EVENT_LINES = {
    "resume": ("resumed", "#7f7f7f", ":"),
    "nonfinite": ("non-finite step", "#ff7f0e", "--"),
    "diverged": ("diverged", "#d62728", "-"),
}
RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)  # matplotlib's tab10, in order
RUN_LINESTYLES = ("-", "--", ":", "-.")  # per-block panels: colour = block, line style = run
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "figure.dpi": 100,
}
PANEL_SIZE = (6.4, 3.6)  # inches per panel
FEW_POINTS = 20  # curves with at most this many points get markers (a single point is otherwise invisible)
DPI = 150


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise UserError(f"plots need matplotlib: {PLOT_EXTRA}") from err
    return matplotlib


def default_metrics(runs: Sequence[Run]) -> list[str]:
    found = [name for name in DEFAULT_METRICS if has_data(list(runs), name)]
    return found or ["loss"]


def check_output(out: str | Path) -> Path:
    """The output file, checked before any drawing: a known format in an existing folder."""
    out = Path(out)
    if out.suffix.lower() not in SAVE_METADATA:
        raise UserError(f"--out {out}: the file name must end in {' or '.join(SAVE_METADATA)}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    return out


# ---------------------------------------------------------------------------------------------------------
# matplotlib figures


def build_figure(
    runs: Sequence[Run], metrics: Sequence[str], x: str = "tokens", smooth_window: int = 1, log_y: bool = False
) -> Any:
    """A matplotlib Figure with one panel per metric, every run overlaid (Agg canvas attached)."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name in metrics:
        metric_named(name)
    ncols = 1 if len(metrics) == 1 else 2
    nrows = math.ceil(len(metrics) / ncols)
    time_unit = _time_unit(runs) if x == "time" else None
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(metrics) :]:
            fig.delaxes(ax)
        for ax, name in zip(axes[: len(metrics)], metrics, strict=True):
            _draw_panel(ax, runs, name, x, smooth_window, log_y, time_unit)
            ax.set_xlabel(_x_label(x, time_unit))
        _share_x_range(axes[: len(metrics)])
        fig.suptitle(_title(runs), fontsize=12)
    return fig


def _draw_panel(
    ax: Any,
    runs: Sequence[Run],
    name: str,
    x: str,
    smooth_window: int,
    log_y: bool,
    time_unit: tuple[str, float] | None,
) -> None:
    metric = METRICS[name]
    scale_x = time_unit[1] if time_unit else 1.0
    smoothed = smooth_window > 1 and metric.kind == "train"
    drawn = 0
    for index, run in enumerate(runs):
        found = series(run, name, x)
        for block, line in enumerate(found):
            color, style = _line_look(index, block, len(found), metric.per_block)
            label = _line_label(run, line, len(runs))
            xs = [v / scale_x for v in line.x]
            look = {"color": color, "linestyle": style}
            if metric.kind == "eval" or len(xs) <= FEW_POINTS:
                look.update(marker="o", markersize=3.5)
            if smoothed:
                ax.plot(xs, line.y, alpha=0.25, linewidth=0.8, label="_raw " + label, **look)
                ax.plot(xs, smooth(line.y, smooth_window), label=label, **look)
            else:
                ax.plot(xs, line.y, label=label, **look)
            drawn += 1
    title = metric.title + (f" (mean of {smooth_window} logs)" if smoothed else "")
    ax.set_title(title, loc="left")
    ax.set_ylabel(metric.unit)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "not logged by "
            + ("this run" if len(runs) == 1 else "these runs")
            + (f"\n({metric.hint})" if metric.hint else ""),
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#777777",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    _draw_event_lines(ax, runs, x, scale_x)
    from matplotlib.ticker import EngFormatter

    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if metric.from_zero:
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    elif log_y or metric.log_scale:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    if len(labelled) > 1:
        ax.legend(frameon=False, ncols=1 + (len(labelled) - 1) // 10, loc="best")


def _share_x_range(axes: Sequence[Any]) -> None:
    """One x range on every panel with data, so a step lines up across panels (eval is sparser than train)."""
    xs = [float(v) for ax in axes for line in ax.get_lines() for v in line.get_xdata()]
    if len(set(xs)) < 2:
        return
    pad = 0.02 * (max(xs) - min(xs))
    for ax in axes:
        if ax.get_lines():
            ax.set_xlim(min(xs) - pad, max(xs) + pad)


def _line_look(run_index: int, block: int, blocks: int, per_block: bool) -> tuple[Any, str]:
    """Colour and line style: one colour per run, or per block (shallow to deep) with one style per run."""
    if not per_block:
        return RUN_COLORS[run_index % len(RUN_COLORS)], "-"
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 * block / max(blocks - 1, 1)), RUN_LINESTYLES[run_index % len(RUN_LINESTYLES)]


def _line_label(run: Run, line: Series, n_runs: int) -> str:
    if not line.label:
        return run.name
    return line.label if n_runs == 1 else f"{run.name}: {line.label}"


def _draw_event_lines(ax: Any, runs: Sequence[Run], x: str, scale_x: float) -> None:
    seen = set()
    for run in runs:
        for kind, (label, color, style) in EVENT_LINES.items():
            for event in run.of_kind(kind):
                at = x_value(run, event, x)
                if at is None:
                    continue
                ax.axvline(
                    at / scale_x,
                    color=color,
                    linestyle=style,
                    linewidth=1.0,
                    alpha=0.7,
                    label=label if kind not in seen else "_" + label,
                )
                seen.add(kind)


def _time_unit(runs: Sequence[Run]) -> tuple[str, float]:
    longest = max((run.wall_time_s for run in runs), default=0.0)
    if longest < 120:
        return "s", 1.0
    if longest < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _x_label(x: str, time_unit: tuple[str, float] | None) -> str:
    return f"{X_AXES[x]} ({time_unit[0]})" if x == "time" and time_unit else X_AXES[x]


def _title(runs: Sequence[Run]) -> str:
    names = [run.name for run in runs]
    return "tokenmill · " + (" vs ".join(names) if len(names) <= 3 else f"{len(names)} runs")


def save_figure(fig: Any, out: str | Path) -> Path:
    """Write the figure to `out` (.png or .svg) through a temporary file, so a failed save leaves no half file."""
    out = check_output(out)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        with _matplotlib().rc_context({"svg.hashsalt": SVG_HASH_SALT}):
            fig.savefig(tmp, format=out.suffix.lower()[1:], dpi=DPI, metadata=SAVE_METADATA[out.suffix.lower()])
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {err.strerror or err}") from err
    return out


# ---------------------------------------------------------------------------------------------------------
# text plots (plotext)

TERMINAL_HEIGHT = 18  # text rows per panel
TERMINAL_MARKERS = ("hd", "dot", "+", "x", "o", "*")  # one per run, so runs differ without colour


def terminal_plot(
    runs: Sequence[Run],
    metrics: Sequence[str],
    x: str = "tokens",
    smooth_window: int = 1,
    log_y: bool = False,
    width: int | None = None,
    color: bool | None = None,
) -> str:
    """One text plot per metric (runs overlaid), for a quick look over ssh; colours only on a terminal."""
    try:
        import plotext
    except ImportError as err:
        raise UserError(f"--terminal needs plotext: {PLOT_EXTRA}") from err
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    color = sys.stdout.isatty() if color is None else color
    figure = plotext.figure
    blocks = []
    for name in metrics:
        metric = metric_named(name)
        found = [(index, run, line) for index, run in enumerate(runs) for line in series(run, name, x)]
        if not found:
            blocks.append(f"{metric.title}: not logged" + (f" ({metric.hint})" if metric.hint else "") + "\n")
            continue
        figure.clear()
        figure.plot_size(width, TERMINAL_HEIGHT)
        for index, run, line in found:
            ys = smooth(line.y, smooth_window) if metric.kind == "train" else line.y
            marker = TERMINAL_MARKERS[index % len(TERMINAL_MARKERS)]
            signal = figure.signal(line.x, ys, marker=marker).lines(True)
            figure.draw(signal.label(_line_label(run, line, len(runs))))
        figure.title(f"{metric.title} ({metric.unit})")
        figure.label(_x_label(x, ("s", 1.0)), axis="x")
        if log_y:
            figure.ruler(axis=1).scale("log")
        blocks.append(figure.build().string(colorless=not color))
    figure.clear()
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------
# ablations


def build_ablation_figure(
    cells: Sequence[tuple[str, Sequence[Run]]], eval_losses: Sequence[Sequence[float]], x: str = "tokens"
) -> Any:
    """Left: each cell's train loss (mean over seeds, band = min..max); right: final eval loss (mean +- std)."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(2 * PANEL_SIZE[0], max(PANEL_SIZE[1], 0.45 * len(cells) + 1.5)), layout="constrained")
        FigureCanvasAgg(fig)
        curves, finals = fig.subplots(1, 2, width_ratios=(3, 2))
        _draw_seed_curves(curves, cells, x)
        _draw_final_losses(finals, [name for name, _ in cells], eval_losses)
        fig.suptitle(f"tokenmill ablation · {len(cells)} cells", fontsize=12)
    return fig


def _draw_seed_curves(ax: Any, cells: Sequence[tuple[str, Sequence[Run]]], x: str) -> None:
    from matplotlib.ticker import EngFormatter

    for index, (name, runs) in enumerate(cells):
        color = RUN_COLORS[index % len(RUN_COLORS)]
        xs, mean, low, high = _seed_band([s for run in runs for s in series(run, "loss", x)])
        if xs:
            marker = "o" if len(xs) <= FEW_POINTS else None
            ax.plot(xs, mean, color=color, label=name, marker=marker, markersize=3.5)
            if len(runs) > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    several = any(len(runs) > 1 for _, runs in cells)
    ax.set_title("Train loss" + (" (mean over seeds, band = min..max)" if several else ""), loc="left")
    ax.set_xlabel(_x_label(x, None))
    ax.set_ylabel("nats/token")
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if ax.get_lines():
        ax.legend(frameon=False)


def _draw_final_losses(ax: Any, names: Sequence[str], eval_losses: Sequence[Sequence[float]]) -> None:
    """A dot per cell (mean, +- std bar, faint dots per seed), labelled with its gap to the best cell: the axis
    zooms to the data, so the labels carry the scale."""
    means = {pos: statistics.fmean(values) for pos, values in enumerate(eval_losses) if values}
    best = min(means.values(), default=None)
    for pos, mean in means.items():
        values = eval_losses[pos]
        color = RUN_COLORS[pos % len(RUN_COLORS)]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.scatter(values, [pos] * len(values), color=color, alpha=0.35, s=14, linewidths=0)
        ax.errorbar([mean], [pos], xerr=[std], fmt="o", color=color, capsize=4, markersize=6)
        gap = "best" if mean == best else f"{mean - best:+.4f}"
        text = f"{mean:.4f}" + (f" ± {std:.4f}" if std else "") + f" ({gap})"
        ax.annotate(text, (mean, pos), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
    ax.set_yticks(list(range(len(names))), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.margins(x=0.25)
    several = any(len(values) > 1 for values in eval_losses)
    ax.set_title("Final eval loss" + (" (mean ± std; faint dots: seeds)" if several else ""), loc="left")
    ax.set_xlabel("nats/token")
    ax.grid(axis="y", visible=False)


def _seed_band(lines: Sequence[Series]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the x values every seed logged."""
    if not lines:
        return [], [], [], []
    common = sorted(set.intersection(*(set(line.x) for line in lines)))
    by_x = [dict(zip(line.x, line.y, strict=True)) for line in lines]
    mean = [statistics.fmean(values[x] for values in by_x) for x in common]
    low = [min(values[x] for values in by_x) for x in common]
    high = [max(values[x] for values in by_x) for x in common]
    return common, mean, low, high

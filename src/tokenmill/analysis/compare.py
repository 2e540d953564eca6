"""Two runs side by side: what their configs change, where their curves part, and their summaries.

`compare_runs` lines a metric up step by step (like torchtitan's scripts/loss_compare.py): two runs agree when
they logged the same steps and every difference is within the tolerance (absolute, in the metric's unit), so
`tokenmill logs compare A B` can gate CI on "this change must not move the loss" (exit 1 when they part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.analysis.runs import Run, flatten
from tokenmill.analysis.series import METRICS, metric_named, series
from tokenmill.analysis.summary import markdown_table, summarize, summary_rows, text_table
from tokenmill.errors import UserError

# Config keys that name where a run lives, not how it trains: never reported as a difference.
LOCATION_KEYS = ("out_dir",)
TABLE_EDGE = 5  # per-step rows shown at the start, around the first divergence and at the end


@dataclass
class Comparison:
    a: Run
    b: Run
    metric: str
    tolerance: float
    config_diff: list[tuple[str, Any, Any]]  # (key, value in A, value in B)
    rows: list[tuple[int, float | None, float | None]]  # (step, A, B) over the steps either run logged
    first_divergence: int | None  # first step beyond the tolerance or logged by one run only
    max_abs_diff: float | None = None
    max_abs_diff_step: int | None = None
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": str(self.a.path),
            "b": str(self.b.path),
            "metric": self.metric,
            "tolerance": self.tolerance,
            "equal": self.equal,
            "first_divergence_step": self.first_divergence,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_step": self.max_abs_diff_step,
            "config_diff": [{"key": k, "a": va, "b": vb} for k, va, vb in self.config_diff],
            "steps": [{"step": s, "a": va, "b": vb, "diff": _diff(va, vb)} for s, va, vb in self.rows],
            "summaries": self.summaries,
        }


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ (a key only one config has shows None on the other side)."""
    flat_a, flat_b = flatten(a), flatten(b)
    keys = sorted(set(flat_a) | set(flat_b))
    return [
        (key, flat_a.get(key), flat_b.get(key))
        for key in keys
        if key.rsplit(".", 1)[-1] not in LOCATION_KEYS and flat_a.get(key) != flat_b.get(key)
    ]


def compare_runs(a: Run, b: Run, metric: str = "loss", tolerance: float = 0.0) -> Comparison:
    if not tolerance >= 0:
        raise UserError(f"--tolerance {tolerance} must be a number >= 0 (0 = bitwise equal values)")
    if metric_named(metric).per_block:
        single = ", ".join(name for name, m in METRICS.items() if not m.per_block)
        raise UserError(f"metric {metric!r} has one curve per block: compare one of {single}")
    values_a, values_b = _by_step(a, metric), _by_step(b, metric)
    if not values_a or not values_b:
        empty = a if not values_a else b
        raise UserError(f"{empty.path} logged no {metric!r} values to compare")
    steps = sorted(set(values_a) | set(values_b))
    rows = [(step, values_a.get(step), values_b.get(step)) for step in steps]
    first = next((step for step, va, vb in rows if va is None or vb is None or abs(vb - va) > tolerance), None)
    diffs = [(abs(vb - va), step) for step, va, vb in rows if va is not None and vb is not None]
    worst = max(diffs) if diffs else (None, None)
    return Comparison(
        a,
        b,
        metric,
        tolerance,
        config_diff(a.config, b.config),
        rows,
        first,
        worst[0],
        worst[1],
        [summarize(a), summarize(b)],
    )


def _by_step(run: Run, metric: str) -> dict[int, float]:
    found = series(run, metric, "steps")
    return dict(zip(map(int, found[0].x), found[0].y, strict=True)) if found else {}


def _diff(va: float | None, vb: float | None) -> float | None:
    return None if va is None or vb is None else vb - va


def _shown_rows(comp: Comparison) -> list[int | None]:
    """Indices of the per-step rows to print (None = an elided stretch)."""
    n = len(comp.rows)
    keep = set(range(min(TABLE_EDGE, n))) | set(range(max(0, n - TABLE_EDGE), n))
    if comp.first_divergence is not None:
        at = next(i for i, row in enumerate(comp.rows) if row[0] == comp.first_divergence)
        keep |= set(range(max(0, at - 2), min(n, at + 3)))
    out: list[int | None] = []
    for i in sorted(keep):
        if out and out[-1] is not None and i != out[-1] + 1:
            out.append(None)
        out.append(i)
    return out


def render_comparison(comp: Comparison, markdown: bool = False) -> str:
    """The report: config diff, per-step table (edges and the divergence), verdict, summaries side by side."""
    table = markdown_table if markdown else text_table
    a, b = comp.a.name, comp.b.name
    parts = []
    if comp.config_diff:
        rows = [(key, [_value(va), _value(vb)]) for key, va, vb in comp.config_diff]
        parts.append("config differences\n" + table(["key", f"A {a}", f"B {b}"], rows))
    else:
        parts.append("config differences: none")
    step_rows = []
    for index in _shown_rows(comp):
        if index is None:
            step_rows.append(("...", ["", "", ""]))
            continue
        step, va, vb = comp.rows[index]
        mark = "  <- first divergence" if step == comp.first_divergence else ""
        step_rows.append((str(step), [_value(va), _value(vb), _signed(_diff(va, vb)) + mark]))
    parts.append(
        f"{comp.metric} per step ({len(comp.rows)} steps)\n" + table(["step", f"A {a}", f"B {b}", "B - A"], step_rows)
    )
    parts.append(verdict(comp))
    parts.append("summaries\n" + table(["", f"A {a}", f"B {b}"], summary_rows(comp.summaries)))
    return "\n\n".join(parts)


def verdict(comp: Comparison) -> str:
    worst = (
        ""
        if comp.max_abs_diff is None
        else f"; largest difference {comp.max_abs_diff:.3g} at step {comp.max_abs_diff_step}"
    )
    if comp.equal:
        return f"equal: {comp.metric} agrees at all {len(comp.rows)} steps within {comp.tolerance:g}{worst}"
    step, va, vb = next(row for row in comp.rows if row[0] == comp.first_divergence)
    if va is None or vb is None:
        only = comp.a.name if vb is None else comp.b.name
        return f"diverged at step {step}: only {only} logged it{worst}"
    return f"diverged at step {step}: |{vb:.6g} - {va:.6g}| = {abs(vb - va):.3g} > tolerance {comp.tolerance:g}{worst}"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3g}"

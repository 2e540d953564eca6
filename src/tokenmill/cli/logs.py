"""`tokenmill logs summary|plot|compare RUN...`: read runs' metrics.jsonl without writing code.

`summary` tabulates what each run did; `plot` draws one panel per metric with the runs overlaid (PNG/SVG, or
text with --terminal); `compare A B` diffs configs and curves and exits 1 when the curves part beyond
--tolerance (for CI). Starts without torch: only tokenmill.analysis (and matplotlib for pictures) is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from tokenmill.errors import UserError

if TYPE_CHECKING:
    from tokenmill.analysis.runs import Run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenmill.analysis.series import METRICS, X_AXES

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser(
        "summary",
        help="status, losses, throughput and problems of each run",
        description="status, losses, throughput and problems of each run (one column per run)",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (a train.out_dir) or its metrics.jsonl")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print a JSON list, one record per run")
    form.add_argument("--markdown", action="store_true", help="print a markdown table")

    p = sub.add_parser(
        "plot",
        help="one panel per metric, runs overlaid (PNG, SVG or text)",
        description="one panel per metric, runs overlaid (PNG, SVG or --terminal text)",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (a train.out_dir) or its metrics.jsonl")
    p.add_argument(
        "--metrics",
        default=None,
        metavar="M,M",
        help=f"comma-separated panels among {', '.join(METRICS)} (default: the usual ones the runs logged)",
    )
    p.add_argument(
        "--x",
        choices=tuple(X_AXES),
        default="tokens",
        help="x axis: optimizer steps, tokens seen (comparable across batch sizes; default) or active wall time",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="trailing mean over N logged points for train metrics (raw curve kept faint)",
    )
    p.add_argument("--log-y", action="store_true", help="log-scale y axes (rates such as tokens/s stay linear)")
    p.add_argument(
        "--out",
        default="plot.png",
        metavar="FILE",
        help="output .png or .svg (default: plot.png in the current folder)",
    )
    p.add_argument("--terminal", action="store_true", help="print text plots instead of writing a file")

    p = sub.add_parser(
        "compare",
        help="config diff and step-by-step curve difference of two runs; exit 1 where they part",
        description="config diff, per-step difference and summaries of two runs; exit 0 when the "
        "curves agree within --tolerance, 1 when they part (usable in CI)",
    )
    p.add_argument("a", metavar="A", help="reference run folder")
    p.add_argument("b", metavar="B", help="run folder compared with A")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        metavar="X",
        help="largest allowed absolute difference per step (default 0: identical values)",
    )
    p.add_argument("--metric", default="loss", metavar="M", help="curve to compare (default loss; e.g. eval_loss)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the comparison as JSON")
    form.add_argument("--markdown", action="store_true", help="print markdown tables")


def run(args: argparse.Namespace) -> int:
    return {"summary": _summary, "plot": _plot, "compare": _compare}[args.action](args)


def _load(paths: list[str]) -> list[Run]:
    """The runs, with each one's warnings (skipped lines) printed to stderr."""
    from tokenmill.analysis.runs import load_runs

    runs = load_runs(paths)
    for run in runs:
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return runs


def _summary(args: argparse.Namespace) -> int:
    from tokenmill.analysis.summary import markdown_table, summarize, summary_rows, text_table

    summaries = [summarize(run) for run in _load(args.runs)]
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        table = markdown_table if args.markdown else text_table
        print(table(["", *(s["run"] for s in summaries)], summary_rows(summaries)))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from tokenmill.analysis import plot
    from tokenmill.analysis.series import parse_metrics

    metrics = parse_metrics(args.metrics) if args.metrics is not None else None
    if args.smooth < 1:
        raise UserError(f"--smooth {args.smooth} must be at least 1 (1 = no smoothing)")
    out = None if args.terminal else plot.check_output(args.out)
    runs = _load(args.runs)
    metrics = metrics or plot.default_metrics(runs)
    if args.terminal:
        print(plot.terminal_plot(runs, metrics, args.x, args.smooth, args.log_y))
        return 0
    figure = plot.build_figure(runs, metrics, args.x, args.smooth, args.log_y)
    plot.save_figure(figure, out)
    print(
        f"wrote {out} ({len(metrics)} panel{'s' * (len(metrics) > 1)}: {', '.join(metrics)}; "
        f"{len(runs)} run{'s' * (len(runs) > 1)})"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tokenmill.analysis.compare import compare_runs, render_comparison

    a, b = _load([args.a, args.b])
    comparison = compare_runs(a, b, args.metric, args.tolerance)
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2))
    else:
        print(render_comparison(comparison, markdown=args.markdown))
    return 0 if comparison.equal else 1

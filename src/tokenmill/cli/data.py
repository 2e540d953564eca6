"""`tokenmill data check [CONFIG] [--preset P] [overrides] [--batches N] [--ranks R] [--workers W] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenmill.cli.common import add_config_arguments
from tokenmill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["check"],
        help="check: duplicate windows across simulated ranks x workers, token statistics, document boundaries, speed",
    )
    add_config_arguments(parser)
    parser.add_argument("--batches", type=int, default=20, metavar="N", help="batches read per simulated rank")
    parser.add_argument("--ranks", type=int, default=2, metavar="R", help="simulated data-parallel ranks")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="W", help="dataloader workers per rank (default: data.num_workers)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--same-rank",
        action="store_true",
        help="self-test: every simulated rank claims rank 0, so the duplicate rate must be > 0",
    )


def _table(report, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data check: {', '.join(cfg.data.sources)}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    dup_style = "green" if report.duplicate_windows == 0 else "bold red"
    rows = [
        (
            "simulated ranks x workers",
            f"{report.ranks} x {report.workers}"
            + ("" if report.rank_ids == list(range(report.ranks)) else f" (rank ids {report.rank_ids})"),
        ),
        ("batches per rank", f"{report.batches_per_rank}"),
        ("windows (tokens each)", f"{report.windows:,} ({report.window_tokens})"),
        ("duplicate windows", f"[{dup_style}]{report.duplicate_rate:.1%}[/] ({report.duplicate_windows:,})"),
        ("tokens", f"{report.tokens:,}"),
        ("distinct token ids", f"{report.unique_tokens:,}"),
        (f"top-{len(report.top_tokens)} tokens share", f"{report.top_share:.1%}"),
        ("EOS share", f"{report.eos_share:.2%}"),
        ("windows spanning documents", f"{report.boundary_share:.1%}"),
        ("tokens/s (this process)", f"{report.tokens_per_s:,.0f}"),
        ("shard checksums", report.checksums),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    tops = ", ".join(f"{t['text']!r} {t['share']:.1%}" for t in report.top_tokens)
    console.print(f"most common tokens: {tops}", markup=False)


def run(args: argparse.Namespace) -> int:
    from tokenmill.cli.config import config_from_args
    from tokenmill.data.check import run_check, verify_shard_checksums
    from tokenmill.data.quality import problem_lines
    from tokenmill.data.shards import is_shard_dir, open_shards
    from tokenmill.data.tokenizer import build_tokenizer

    for name in ("batches", "ranks"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)} must be >= 1")
    cfg = config_from_args(args)
    workers = cfg.data.num_workers if args.workers is None else args.workers
    if workers < 0:
        raise UserError(f"--workers={workers} must be >= 0")
    tokenizer = build_tokenizer(cfg.data, Path(cfg.train.out_dir) / "tokenizer")
    rank_ids = [0] * args.ranks if args.same_rank else None
    report = run_check(cfg, tokenizer, args.batches, args.ranks, workers, rank_ids)
    shard_dirs = [s for s in cfg.data.sources if is_shard_dir(Path(s).expanduser())]
    epoch_windows = None
    if shard_dirs:
        report.checksums = verify_shard_checksums(shard_dirs[0])
        shards = open_shards(shard_dirs[0], "train", tokenizer, verify="none")
        epoch_windows = sum(s.tokens // (cfg.train.seq_len + 1) for s in shards.shards)
    for line in problem_lines(report.sources or report.prepared):
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps({**report.to_dict(), "epoch_windows": epoch_windows}, indent=1))
        return 0
    _table(report, cfg)
    if epoch_windows is not None and report.windows > epoch_windows:
        print(
            f"note: {report.windows:,} windows read but one epoch holds {epoch_windows:,}: later epochs repeat "
            f"windows, so duplicates are expected; use fewer --batches"
        )
    return 0

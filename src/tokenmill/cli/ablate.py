"""`tokenmill ablate BASE.yaml|--preset P --grid key=v1,v2 [--grid ...] [--seeds 1,2] [--max-steps N]
[--out-dir DIR] [--parallel N] [overrides]`: a grid of training runs and a table of their results.

Each (cell, seed) is a `python -m tokenmill train` child in DIR/<cell>/seed<S>; a rerun skips finished runs
and resumes interrupted ones. Overrides after the base apply to every cell. Starts without torch (the
children import it). Exit 0 when every run finished, 1 when one failed (its log is named).
"""

from __future__ import annotations

import argparse

DEFAULT_OUT_DIR = "runs/ablation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenmill.cli.common import add_config_arguments

    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values; repeat for more keys (cells = every combination)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="S,S",
        help="run each cell once per seed (train.seed); default: the base's seed",
    )
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps per run")
    parser.add_argument(
        "--out-dir",
        default=DEFAULT_OUT_DIR,
        metavar="DIR",
        help=f"folder of the runs and results (default {DEFAULT_OUT_DIR})",
    )
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once (default 1)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tokenmill.analysis.ablate import Base, ablate, parse_grid, parse_seeds, results_markdown
    from tokenmill.cli.common import presets_from_args

    base = Base(tuple(presets_from_args(args)), args.config_file, tuple(args.overrides))
    grid = parse_grid(args.grid)
    result = ablate(
        base,
        grid,
        parse_seeds(args.seeds),
        args.max_steps,
        args.out_dir,
        args.parallel,
        echo=lambda line: print(line, flush=True),
    )
    print()
    print(results_markdown(result.cells, list(grid)))
    print()
    for note in result.notes:
        print(note)
    print("wrote " + ", ".join(str(path) for path in result.files))
    for job in result.failed:
        print(f"failed: {job.cell} seed {job.seed}: {job.message}")
    return 1 if result.failed else 0

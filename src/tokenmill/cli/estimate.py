"""`tokenmill estimate [CONFIG.yaml] [--preset P] [overrides] [--gpu NAME] [--micro-batch B] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tokenmill.cli.common import add_config_arguments
from tokenmill.metrics import flops, memory
from tokenmill.metrics.estimate import DEFAULT_GPU, estimate, resolve_gpu


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--gpu",
        default=DEFAULT_GPU,
        metavar="NAME",
        help=f"GPU for the memory plan and timing (default {DEFAULT_GPU}): "
        + ", ".join(flops.GPUS)
        + ", or a torch.cuda.get_device_name() string",
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        metavar="B",
        help="sequences per micro-batch for the activation plan (default train.micro_batch_size)",
    )
    parser.add_argument("--n-gpus", type=int, default=1, metavar="N", help="GPUs sharing the token budget (time)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


# ---------------------------------------------------------------------------------------------------
# Printing


def _gib(n: float) -> str:
    return f"{n / memory.GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:,.1f} days ({hours:,.0f} h)" if hours >= 48 else f"{hours:,.2f} h"


def _table(console: Any, title: str) -> Any:
    """A table whose title is printed as its own line, so it never wraps to the table's width."""
    from rich.table import Table

    console.print()
    console.print(title, style="bold", markup=False)
    return Table()


def print_report(report: dict[str, Any], file: Any = None) -> None:
    """Human tables (rich); wide enough that numbers are never cropped when stdout is not a terminal."""
    from rich.console import Console

    console = Console(file=file or sys.stdout, width=110, highlight=False)
    m, p, f, g = report["model"], report["parameters"], report["flops"], report["gpu"]

    t = _table(
        console,
        f"Model ({m['n_layers']}L, d={m['d_model']}, {m['n_heads']} heads / {m['n_kv_heads']} kv, "
        f"{m['ffn']} {m['ffn_hidden']}, vocab {m['vocab_size']})",
    )
    t.add_column("parameters")
    t.add_column("count", justify="right")
    for key in ("total", "non_embedding", "embedding", "trainable", "matmul"):
        t.add_row(key.replace("_", "-"), f"{p[key]:,}")
    console.print(t)

    t = _table(console, f"Training FLOPs per token at seq_len {f['seq_len']}: {f['formula']}")
    t.add_column("part")
    t.add_column("FLOPs/token", justify="right")
    t.add_column("share", justify="right")
    for key, value in f["breakdown"].items():
        t.add_row(key.replace("_", " "), f"{value:,.0f}", f"{value / f['per_token']:.1%}")
    t.add_row("causal count", f"{f['per_token_causal']:,.0f}", "")
    ratio = f["attention_ffn_ratio"]
    t.add_row("attention / FFN", f"{ratio:.3f}" if ratio is not None else "n/a", "")
    console.print(t)

    mem = report["memory"]
    t = _table(
        console,
        f"Memory per GPU, micro-batch {mem['micro_batch']} x {mem['seq_len']} tokens, AdamW "
        f"(AC = activation checkpointing of every block)",
    )
    t.add_column("")
    for mode in mem["plan"]:
        t.add_column(mode, justify="right")
    rows = [
        ("weights", lambda d: d["weights"]),
        ("gradients", lambda d: d["gradients"]),
        ("optimizer (2 fp32 states)", lambda d: d["optimizer"]),
        ("static total", lambda d: d["static_total"]),
        ("activations, no AC", lambda d: d["activations"]["none"]["total"]),
        (
            "  of which logits + loss",
            lambda d: d["activations"]["none"]["logits"] + d["activations"]["none"]["loss_backward"],
        ),
        ("activations, AC", lambda d: d["activations"]["all"]["total"]),
        ("peak, no AC", lambda d: d["peak_total"]["none"]),
        ("peak, AC", lambda d: d["peak_total"]["all"]),
    ]
    for label, get in rows:
        t.add_row(label, *(_gib(get(d)) for d in mem["plan"].values()))
    console.print(t)

    fit = report["max_micro_batch"]
    t = _table(
        console,
        f"Largest micro-batch on {g['name']} ({g['memory_gib']:g} GiB; usable "
        f"{_gib(mem['usable_bytes'])}: {mem['safety']})",
    )
    t.add_column("")
    for mode in fit:
        t.add_column(mode, justify="right")
    for label, key in (("no AC", "none"), ("AC", "all")):
        t.add_row(label, *(str(fit[mode][key]) if fit[mode][key] else "does not fit" for mode in fit))
    console.print(t)

    b = report["budget"]
    gpus = f"{b['n_gpus']} x {g['name']}" if b["n_gpus"] > 1 else g["name"]
    t = _table(
        console, f"Time to {b['tokens']:,} tokens ({b['source']}) on {gpus}, bf16 peak {b['peak_tflops']:g} TFLOPS"
    )
    t.add_column("MFU")
    t.add_column("time", justify="right")
    t.add_column("tokens/s", justify="right")
    for label, seconds in b["time_s"].items():
        t.add_row(label, _duration(seconds), f"{b['tokens'] / seconds:,.0f}")
    console.print(t)
    console.print(f"GPU peaks: {g['source']}" + (f" ({g['note']})" if g["note"] else ""), markup=False)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False)


def run(args: argparse.Namespace) -> int:
    from tokenmill.cli.config import config_from_args

    gpu = resolve_gpu(args.gpu)
    report = estimate(config_from_args(args), gpu, args.micro_batch, args.n_gpus)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0

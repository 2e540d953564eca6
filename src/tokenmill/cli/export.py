"""`tokenmill export RUN|CHECKPOINT --format hf --out DIR`: a Hugging Face model folder from a checkpoint.

The folder loads offline with `AutoModelForCausalLM` / `AutoTokenizer` (GPT-2, Llama or, for QK-norm models,
Qwen3). It is verified by default: transformers reloads it on the CPU and its logits are compared with tokenmill's
on a probe batch; the largest difference is printed. An existing non-empty --out is refused unless --force, and
is replaced only once the new folder is complete and verified.
"""

from __future__ import annotations

import argparse

FORMATS = ("hf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="RUN|CHECKPOINT",
        help="checkpoint folder, or run folder (its latest valid checkpoint; --best for the best)",
    )
    parser.add_argument("--format", choices=FORMATS, default="hf", help="output format: hf (transformers folder)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be new or empty)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weight dtype (default fp32)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the folder with transformers")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="split the safetensors weights into files of at most SIZE, plus an index (default 5GB)",
    )
    parser.add_argument("--best", action="store_true", help="from a run folder, the best checkpoint by eval loss")


def run(args: argparse.Namespace) -> int:
    from tokenmill.interop.hf import quiet_transformers

    quiet_transformers()  # also reports a missing `hf` extra first
    from tokenmill.interop.export import PROBE_SHAPE, export_hf

    result = export_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        verify=not args.no_verify,
        force=args.force,
        max_shard_size=args.max_shard_size,
        which="best" if args.best else "latest",
    )
    print(
        f"wrote {result.out}: {result.hf_class}, {result.dtype}, {len(result.files)} files, "
        f"{result.bytes / 2**20:.1f} MiB"
    )
    if result.max_logit_diff is None:
        print("not verified (--no-verify)")
    else:
        print(
            f"verified with transformers: max |logit difference| {result.max_logit_diff:.2e}, "
            f"KL {result.kl:.2e} per token, on {PROBE_SHAPE[0]} probe sequences"
        )
    return 0

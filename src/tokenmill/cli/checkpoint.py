"""`tokenmill checkpoint consolidate DIR OUT`: one weights file, or one loadable folder, from a sharded checkpoint.

FSDP and pipeline runs save every rank's shards (checkpoint/sharded.py); tools that want a single file
(export, inference on one GPU, sharing) get it here, without a process group or GPUs. DIR may be a
checkpoint folder or a run folder (its latest valid checkpoint). OUT ending in `.safetensors` gets the
weights alone; any other OUT becomes a checkpoint folder (weights, config, tokenizer) that
`tokenmill.load_model` and every command taking a checkpoint accept. The checkpoint is verified first, and
an existing OUT is kept unless `--force`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("consolidate", help="merge a sharded checkpoint's model weights into one file or folder")
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint folder (or run folder: its latest valid checkpoint)")
    p.add_argument(
        "out",
        metavar="OUT",
        help="OUT.safetensors (weights only) or a new folder (a loadable "
        "checkpoint); written under a temporary name, then renamed",
    )
    p.add_argument(
        "--which",
        choices=("latest", "best"),
        default="latest",
        help="with a run folder: its latest valid checkpoint or the best by eval loss",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT file or checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenmill.checkpoint.find import find_checkpoint
    from tokenmill.checkpoint.folder import is_sharded, read_manifest
    from tokenmill.checkpoint.sharded import consolidate
    from tokenmill.errors import UserError

    out = Path(args.out)
    if out.exists() and not args.force:  # before any work: nothing to lose, nothing to wait for
        raise UserError(f"{out} already exists: choose another output, or pass --force to replace it")
    folder = find_checkpoint(args.checkpoint, args.which)
    if not is_sharded(folder, read_manifest(folder)):
        raise UserError(
            f"checkpoint {folder} is not sharded: it already holds one model.safetensors, which "
            f"tokenmill.load_model and every command taking a checkpoint read directly"
        )
    consolidate(folder, out, overwrite=args.force)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir()))
    print(f"wrote {out} ({size / 2**20:.1f} MiB) from {folder}")
    return 0

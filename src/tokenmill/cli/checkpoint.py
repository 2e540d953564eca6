"""`tokenmill checkpoint consolidate DIR OUT.safetensors`: one weights file from a sharded (DCP) checkpoint.

FSDP and pipeline runs save every rank's shards (parallel/dcp.py); tools that want a single file (export,
inference on one GPU, sharing) get it here, without a process group or GPUs. DIR may be a checkpoint folder
or a run folder (its latest valid checkpoint is used). The manifest is verified first, so a damaged or
partial checkpoint is reported instead of consolidated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenmill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("consolidate", help="merge a sharded checkpoint's model weights into one safetensors file")
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint folder (or run folder: its latest valid checkpoint)")
    p.add_argument("out", metavar="OUT.safetensors", help="output file (written to a temporary name, then renamed)")


def run(args: argparse.Namespace) -> int:
    from tokenmill.checkpoint.manager import CHECKPOINTS, Checkpointer
    from tokenmill.checkpoint.resume import resolve_resume
    from tokenmill.checkpoint.sharded import consolidate

    path = Path(args.checkpoint)
    if (path / CHECKPOINTS).is_dir():
        found = resolve_resume(path, True)
        if found is None:
            raise UserError(f"{path} holds no valid checkpoint to consolidate")
        path = found
    else:
        Checkpointer(path.parent.parent).verify(path)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"output {out} must end in .safetensors")
    consolidate(path, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) from {path}")
    return 0

"""`tokenmill prepare SOURCE --tokenizer T --out DIR`: pre-tokenize a source into memory-mapped shards.

SOURCE uses the `data.sources` syntax (stdlib, a local txt/jsonl/parquet/save_to_disk path, a Hub name or
shortcut). Rerunning the same command after an interruption continues after the last completed chunk;
a folder holding a different prepared dataset is refused unless --overwrite. Use the result with
`--data.sources=[DIR] --data.tokenizer=DIR` (prepare saves the tokenizer.json beside the shards).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenmill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="stdlib, a local txt/jsonl/parquet/save_to_disk path, or a Hub dataset")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="T",
        help="byte, a tokenizer.json path (or folder holding one), or a Hub model repo",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="N", help="tokenizer processes (default: CPU count)"
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 27,
        metavar="N",
        help="tokens per chunk of the source (one train + one eval shard each; default 2^27)",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.02,
        metavar="F",
        help="share of documents held out for eval, by a hash of the document text",
    )
    parser.add_argument("--text-field", default="text", metavar="F", help="column holding the document text")
    parser.add_argument("--overwrite", action="store_true", help="replace a different prepared dataset in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_tokenizer(name: str):
    from tokenmill.data.tokenizer import load_tokenizer

    if name == "bpe":
        raise UserError(
            "prepare needs a fixed tokenizer: train one with `tokenmill tokenizer train --source S "
            "--vocab-size N --out DIR` and pass --tokenizer DIR/tokenizer.json (or use byte)"
        )
    return load_tokenizer(name)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tokenmill.data.prepare import prepare_documents
    from tokenmill.data.quality import problem_lines
    from tokenmill.data.sources import open_source

    if args.workers < 1:
        raise UserError(f"--workers={args.workers} must be >= 1")
    tokenizer = _load_tokenizer(args.tokenizer)
    source = open_source(args.source, args.text_field, stream_local=True)  # one pass: no Arrow copy of local files
    reader = source.reader(0, 0, 1, None, None)  # epoch 0, natural order, one slot: the whole source
    out = Path(args.out)
    console = Console(stderr=True)
    columns = (
        SpinnerColumn(),
        TextColumn(
            "[bold]prepare[/] {task.fields[docs]:,} docs  {task.fields[mb]:,.1f} MB  "
            "{task.fields[mbs]:,.1f} MB/s  {task.fields[tokens]:,} tokens"
        ),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, disable=args.no_progress, transient=False) as bar:
            task = bar.add_task("prepare", total=None, docs=0, mb=0.0, mbs=0.0, tokens=0)
            started = bar.get_time()

            def progress(docs: int, nbytes: int, tokens: int) -> None:
                seconds = max(bar.get_time() - started, 1e-9)
                bar.update(task, docs=docs, mb=nbytes / 1e6, mbs=nbytes / 1e6 / seconds, tokens=tokens)

            stats = prepare_documents(
                reader,
                tokenizer,
                out,
                tokenizer_spec=args.tokenizer,
                source=args.source,
                text_field=args.text_field,
                eval_fraction=args.eval_fraction,
                shard_tokens=args.shard_tokens,
                workers=args.workers,
                overwrite=args.overwrite,
                progress=progress,
                doc_counts=reader.counts,
            )
    finally:
        reader.close()
    if tokenizer.backend is not None:
        tokenizer.save(out)  # so `data.tokenizer=DIR` finds the exact tokenizer the shards were built with
    from tokenmill.data.shards import read_manifest

    manifest = read_manifest(out)
    if stats.resumed_chunks < 0:
        print(f"{out} is already prepared with these settings: nothing to do")
    else:
        resumed = f", resumed after {stats.resumed_chunks} chunks" if stats.resumed_chunks else ""
        print(
            f"read {stats.bytes / 1e6:,.1f} MB in {stats.seconds:.1f} s = {stats.mb_per_s:,.1f} MB/s "
            f"({args.workers} workers{resumed})"
        )
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['tokens']:,} tokens, {info['docs']:,} documents, {len(info['shards'])} shards "
            f"({manifest['dtype']})"
        )
    for line in problem_lines({source.name: reader.counts.to_dict()}):
        print(line, file=sys.stderr)
    print(f"use it with: --data.sources=[{out}] --data.tokenizer={out if tokenizer.backend is not None else 'byte'}")
    return 0

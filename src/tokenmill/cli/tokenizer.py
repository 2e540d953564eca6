"""`tokenmill tokenizer train --source S --vocab-size N --out DIR`: train a byte-level BPE.

Also `tokenmill tokenizer info NAME` to print a tokenizer's vocab size, special ids and hash.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenmill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on a source and write DIR/tokenizer.json")
    train.add_argument(
        "--source",
        default="stdlib",
        help="stdlib, a local txt/jsonl/parquet/save_to_disk path, "
        "a Hub shortcut or org/name[@config] (default: stdlib)",
    )
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    train.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    train.add_argument("--text-field", default="text", help="column holding the document text (default: text)")
    train.add_argument("--max-chars", type=int, default=0, help="train on at most this many characters (0 = all)")
    train.add_argument("--force", action="store_true", help="replace an existing DIR/tokenizer.json")
    train.add_argument("--no-progress", action="store_true", help="hide the progress display")
    info = sub.add_parser("info", help="print vocab size, special-token ids and content hash of a tokenizer")
    info.add_argument("name", help="byte, a tokenizer.json path or a Hub repo id")


def run(args: argparse.Namespace) -> int:
    from tokenmill.data.tokenizer import load_tokenizer, train_bpe

    if args.action == "info":
        tok = load_tokenizer(args.name)
        print(f"{tok.name}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} bos_id={tok.bos_id} hash={tok.hash}")
        return 0

    from tokenmill.data.sources import open_source

    out = Path(args.out)
    if (out / "tokenizer.json").exists() and not args.force:
        raise UserError(f"{out / 'tokenizer.json'} already exists: choose another --out or pass --force")
    if args.max_chars < 0:
        raise UserError(f"--max-chars={args.max_chars} must be >= 0")
    source = open_source(args.source, args.text_field, stream_local=True)  # one pass: no Arrow copy of local files
    started = time.perf_counter()
    texts = source.iter_texts(max_chars=args.max_chars or None)
    sample: list[str] = []

    def keep_sample():
        for text in texts:
            if len(sample) < 64:
                sample.append(text)
            yield text

    tok = train_bpe(keep_sample(), args.vocab_size, out, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    print(
        f"wrote {out / 'tokenizer.json'}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} bos_id={tok.bos_id} "
        f"hash={tok.hash} ({n_bytes / max(1, n_tokens):.2f} bytes/token on the first documents, {seconds:.1f}s)"
    )
    return 0

"""Bytes read per (rank, worker) slot by a streaming source. Prints a table; asserts nothing.

A streaming source (a Hub dataset, or local files with data.stream_local_files) with at least as many units
(parquet row groups, other files) as slots gives each slot whole units, so all slots together parse the data
once (1.0x). With fewer units than slots every slot parses the whole stream and keeps its share of documents
(n_slots x). The rows read one epoch of a local parquet folder with the real training loader, one simulated
rank per slot (slot = rank), and report the text bytes every slot pulled from the source
(`stats()["sources"][...]["scanned_bytes"]`) against the bytes of the data.

Usage: OMP_NUM_THREADS=1 python benchmarks/data_stream_slots.py [--docs 4000] [--slots 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

WORDS = ["the", "of", "and", "to", "in", "is", "for", "that", "with", "as", "on", "by", "data", "model", "token"]


def write_parts(folder: Path, files: int, docs: int, row_group: int) -> int:
    """`docs` documents split over `files` parquet files; returns the UTF-8 bytes of all texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(docs)]
    per = -(-docs // files)
    for i in range(files):
        pq.write_table(
            pa.table({"text": texts[i * per : (i + 1) * per]}),
            folder / f"part{i:03d}.parquet",
            row_group_size=row_group,
        )
    return sum(len(t.encode()) for t in texts)


def read_epoch(folder: Path, slots: int) -> tuple[list[int], float]:
    """Per-slot scanned bytes and seconds for one epoch over `slots` simulated ranks."""
    from tokenmill.config import Config
    from tokenmill.data.loader import build_loader
    from tokenmill.data.tokenizer import Tokenizer

    cfg = Config()
    cfg.data.sources = [str(folder)]
    cfg.data.stream_local_files = True
    cfg.data.eval_fraction = 0.0
    cfg.train.seq_len, cfg.train.micro_batch_size = 255, 8
    cfg.validate()
    tok = Tokenizer.byte()
    per_slot = []
    started = time.perf_counter()
    for rank in range(slots):
        loader = build_loader(cfg, tok, "train", rank, slots, epochs=1, num_workers=0)
        for _ in loader:
            pass
        per_slot.append(loader.stats()["sources"][str(folder)]["scanned_bytes"])
        loader.close()
    return per_slot, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000, help="documents in the folder")
    parser.add_argument("--slots", type=int, default=4, help="(rank, worker) slots, simulated as ranks")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for files, row_group in ((12, 256), (2, 256), (2, args.docs)):
            folder = Path(tmp) / f"files{files}-rg{row_group}"
            data_bytes = write_parts(folder, files, args.docs, row_group)
            units = files * -(-args.docs // files // row_group)
            per_slot, seconds = read_epoch(folder, args.slots)
            mode = "whole units per slot" if units >= args.slots else "every slot reads all, keeps 1/n"
            rows.append((files, units, mode, data_bytes, per_slot, seconds))
    print(
        f"{'files':>5} {'units':>5} {'slots':>5}  {'mode':<32} {'data MB':>8} {'read MB':>8} {'read/data':>9} "
        f"{'per slot MB':<28} {'s':>6}"
    )
    for files, units, mode, data_bytes, per_slot, seconds in rows:
        total = sum(per_slot)
        slots = " ".join(f"{b / 1e6:.2f}" for b in per_slot)
        print(
            f"{files:>5} {units:>5} {args.slots:>5}  {mode:<32} {data_bytes / 1e6:>8.2f} {total / 1e6:>8.2f} "
            f"{total / data_bytes:>8.2f}x {slots:<28} {seconds:>6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data pipeline throughput against the data-loading speed goals below. Prints a table; asserts nothing.

Rows:
- shard loader tokens/s in one process (goal >= 50M tokens/s): B x (T+1) windows from a prepared uint16
  folder of --tokens random tokens, read for one whole epoch;
- resident memory (VmRSS) before and after that read, next to a naive np.memmap that keeps its map
  (the leak of karpathy/nanoGPT#287 that the loader avoids);
- streaming tokenize + pack tokens/s (data.loader, 0 workers, no shuffle buffer so that every window is
  tokenized inside the timed loop, a BPE trained on stdlib, stdlib documents from a jsonl file) against
  raw `tokenizers` encode_batch of the same documents in the same process (goal >= 90% of raw);
- `prepare` MB/s of the stdlib corpus with the same BPE, 1 and N worker processes.

Usage: OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--tokens 256M] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_folder(folder: Path, n_tokens: int, doc_len: int = 600) -> None:
    """A prepared folder of random uint16 tokens (vocab 50257) in 4 shards, documents of `doc_len` tokens."""
    from types import SimpleNamespace

    from tokenmill.data.shards import new_manifest, write_manifest, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    tok = SimpleNamespace(hash="bench", vocab_size=50257, eos_id=50256)
    manifest = new_manifest(tok, "bench", {"source": "random"})
    rng = np.random.default_rng(0)
    per = n_tokens // 4
    for i in range(4):
        tokens = rng.integers(0, 50257, per, dtype=np.uint16)
        entry = write_shard(folder, f"train-{i:05d}", tokens, np.arange(0, per, doc_len, dtype=np.int64))
        info = manifest["splits"]["train"]
        info["shards"].append(entry)
        info["tokens"] += entry["tokens"]
        info["docs"] += entry["docs"]
    manifest["complete"] = True
    write_manifest(folder, manifest)


def bench_shard_loader(folder: Path, batch: int, seq_len: int) -> dict[str, float]:
    from tokenmill.data.shards import build_shard_loader

    loader = build_shard_loader(folder, None, "train", batch, seq_len, seed=0, shuffle_buffer=1)
    n_batches = loader.dataset.reader.n_windows // batch  # one epoch: every page of the files is touched
    it = iter(loader)
    next(it)
    before = rss_mb()
    start = time.perf_counter()
    for _ in range(n_batches - 1):
        next(it)
    seconds = time.perf_counter() - start
    after = rss_mb()
    tokens = (n_batches - 1) * batch * (seq_len + 1)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "rss_before": before, "rss_after": after}


def bench_naive_memmap(folder: Path, window: int) -> dict[str, float]:
    """What a loader that keeps one np.memmap open does to RSS after reading the same data."""
    from tokenmill.data.shards import open_shards

    maps = [np.memmap(s.path, dtype=np.uint16, mode="r") for s in open_shards(folder, "train").shards]
    before = rss_mb()
    rng = np.random.default_rng(0)
    for mm in maps:
        for w in rng.permutation(mm.size // window):
            np.asarray(mm[w * window : (w + 1) * window], dtype=np.int64)
    return {"rss_before": before, "rss_after": rss_mb()}


def stdlib_texts(max_chars: int) -> list[str]:
    from tokenmill.data.sources import open_source

    return list(open_source("stdlib").iter_texts(max_chars=max_chars))


def bench_streaming(tok, tmp: Path, batch: int, seq_len: int, chars: int, repeats: int = 3) -> dict[str, float]:
    """data.loader (0 workers) vs raw backend.encode_batch on the same documents, same process; best of
    `repeats` alternating runs (and, for raw, of two chunkings), since this machine's cores are shared."""
    import json

    from tokenmill.config import load_config
    from tokenmill.data.loader import build_loader

    texts = stdlib_texts(max_chars=chars)
    src = tmp / "stream.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = load_config(
        ["tiny"],
        None,
        [
            f"--data.tokenizer={tok.name}",
            f"--data.sources=[{src}]",
            f"--train.seq_len={seq_len}",
            f"--train.micro_batch_size={batch}",
            "--data.num_workers=0",
            "--data.eval_fraction=0",
            "--data.shuffle_buffer=0",
            f"--train.out_dir={tmp}",
        ],
    )
    best_raw = best_loader = 0.0
    for _ in range(repeats):
        # the packer's chunking (256K characters), and plain 512-document calls
        for chunk_chars, chunk_docs in ((1 << 18, 512), (1 << 62, 512)):
            start, raw_tokens, i = time.perf_counter(), 0, 0
            while i < len(texts):
                j, size = i, 0
                while j < len(texts) and size < chunk_chars and j - i < chunk_docs:
                    size, j = size + len(texts[j]), j + 1
                raw_tokens += sum(len(e.ids) for e in tok.backend.encode_batch(texts[i:j], add_special_tokens=False))
                i = j
            best_raw = max(best_raw, raw_tokens / (time.perf_counter() - start))

        it, tokens = iter(build_loader(cfg, tok, "train")), 0
        next(it)  # warm-up (opening the source); no shuffle buffer, so every window read is tokenized in the loop
        start = time.perf_counter()
        while tokens < raw_tokens:  # steady state, as many tokens as the raw run (the loader cycles epochs)
            tokens += next(it)["tokens"].numel()
        best_loader = max(best_loader, tokens / (time.perf_counter() - start))
    return {"loader_tokens_per_s": best_loader, "raw_tokens_per_s": best_raw, "mb": sum(map(len, texts)) / 1e6}


def bench_prepare(tok, out: Path, workers: int) -> dict[str, float]:
    from tokenmill.data.prepare import prepare_documents
    from tokenmill.data.sources import open_source

    stats = prepare_documents(
        open_source("stdlib").iter_texts(),
        tok,
        out,
        tokenizer_spec=tok.name,
        source="stdlib",
        eval_fraction=0.02,
        workers=workers,
        overwrite=True,
    )
    return {"mb_per_s": stats.mb_per_s, "mb": stats.bytes / 1e6, "tokens": stats.tokens}


def parse_count(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.data.tokenizer import train_bpe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256M", help="tokens in the synthetic shard folder (default 256M = 512 MB)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare worker processes")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocab for the streaming and prepare rows")
    p.add_argument("--stream-chars", default="4M", help="text for the streaming comparison")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "shards"
        make_folder(folder, parse_count(args.tokens))
        r = bench_shard_loader(folder, args.batch, args.seq_len)
        rows.append(
            (
                "shard loader, 1 process",
                f"{r['tokens_per_s'] / 1e6:,.1f}M tokens/s",
                f"B={args.batch}, T={args.seq_len}, one epoch of {r['tokens'] / 1e6:,.0f}M tokens; goal >= 50M",
            )
        )
        rows.append(
            (
                "RSS over that epoch (loader)",
                f"{r['rss_before']:,.0f} -> {r['rss_after']:,.0f} MB",
                f"file size {parse_count(args.tokens) * 2 / 1e6:,.0f} MB",
            )
        )
        n = bench_naive_memmap(folder, args.seq_len + 1)
        rows.append(
            (
                "RSS, naive np.memmap kept open",
                f"{n['rss_before']:,.0f} -> {n['rss_after']:,.0f} MB",
                "same windows, one map per file",
            )
        )

        tok = train_bpe(stdlib_texts(max_chars=4_000_000), args.vocab, tmp / "bpe", progress=False)
        s = bench_streaming(tok, tmp, args.batch, args.seq_len, parse_count(args.stream_chars))
        ratio = s["loader_tokens_per_s"] / s["raw_tokens_per_s"]
        rows.append(
            (
                "streaming tokenize+pack (data.loader)",
                f"{s['loader_tokens_per_s'] / 1e6:,.2f}M tokens/s",
                f"BPE {args.vocab}, {s['mb']:.1f} MB of stdlib as jsonl, 0 workers, no shuffle buffer, best of 3",
            )
        )
        rows.append(
            (
                "raw tokenizers encode_batch",
                f"{s['raw_tokens_per_s'] / 1e6:,.2f}M tokens/s",
                f"loader = {ratio:.0%} of raw; goal >= 90%",
            )
        )
        for workers in sorted({1, args.workers}):
            pr = bench_prepare(tok, tmp / f"prep{workers}", workers)
            rows.append(
                (
                    f"prepare, {workers} worker{'s' if workers > 1 else ''}",
                    f"{pr['mb_per_s']:,.1f} MB/s",
                    f"stdlib {pr['mb']:,.1f} MB -> {pr['tokens'] / 1e6:,.1f}M tokens, BPE {args.vocab}",
                )
            )

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table(
        title=f"data throughput - {time.strftime('%Y-%m-%d')} - {cpu_model()} ({os.cpu_count()} cores, "
        f"load average {load})"
    )
    for col in ("measurement", "result", "setup"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()

"""`tokenmill data check`: does the loader give every (rank, worker) different data, and what is in it?

It builds the real training loader once per simulated rank (same `build_loader` the trainer uses, so the
check covers sources, mixtures, packing, sharding and the shard loader alike), reads N batches from each,
and reports:
- duplicate-window rate: windows whose tokens (hashed) were already seen, over all windows read; a
  correct setup prints 0.0% as long as N batches stay within one epoch of the data;
- token statistics: count, distinct ids, share of the most common ids, share of EOS;
- the share of windows that span a document boundary (doc_ids change inside the window);
- tokens per second of the whole read (all simulated ranks in this one process);
- per source, the documents that lost text (null or non-text field, undecodable bytes): a property of the
  data, summed over the simulated ranks, never reported as a sharding problem.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TOP_K = 5


@dataclass
class CheckReport:
    """Everything `data check` measured; `to_dict()` is the --json output."""

    ranks: int
    workers: int
    batches_per_rank: int
    windows: int = 0
    window_tokens: int = 0
    tokens: int = 0
    duplicate_windows: int = 0
    unique_tokens: int = 0
    eos_share: float = 0.0
    top_tokens: list[dict[str, Any]] = field(default_factory=list)
    top_share: float = 0.0
    boundary_share: float = 0.0
    seconds: float = 0.0
    rank_ids: list[int] = field(default_factory=list)
    checksums: str = "not checked"
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # quality.DocCounts per source, all ranks
    prepared: dict[str, dict[str, int]] = field(default_factory=dict)  # a shards folder: what prepare counted

    @property
    def duplicate_rate(self) -> float:
        return self.duplicate_windows / max(self.windows, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duplicate_rate": self.duplicate_rate, "tokens_per_s": self.tokens_per_s}


def run_check(
    cfg: Any, tokenizer: Any, batches: int, ranks: int, workers: int, rank_ids: list[int] | None = None
) -> CheckReport:
    """Read `batches` train batches from each simulated rank (rank_ids[i] plays rank i; default 0..ranks-1).

    Giving two simulated ranks the same id is a deliberately broken setup: the duplicate rate must show it.
    """
    from tokenmill.data.loader import build_loader
    from tokenmill.data.quality import add_counts

    rank_ids = list(range(ranks)) if rank_ids is None else list(rank_ids)
    report = CheckReport(ranks, workers, batches, rank_ids=rank_ids)
    seen: set[bytes] = set()
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    boundary = 0
    started = time.perf_counter()
    for rank in rank_ids:
        loader = build_loader(cfg, tokenizer, "train", rank=rank, world_size=ranks, num_workers=workers)
        it = iter(loader)
        for _ in range(batches):
            batch = next(it)
            tokens = batch["tokens"].numpy()
            doc_ids = batch["doc_ids"].numpy()
            for row in tokens:
                key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                report.duplicate_windows += key in seen
                seen.add(key)
            counts += np.bincount(tokens.ravel(), minlength=counts.size)[: counts.size]
            boundary += int((doc_ids[:, -1] != doc_ids[:, 0]).sum())
            report.windows += tokens.shape[0]
            report.window_tokens = tokens.shape[1]
        stats = loader.stats()
        report.sources = add_counts(report.sources, stats["sources"])
        report.prepared = stats.get("prepared", {})
        loader.close()
        del it, loader  # stop this rank's worker processes before the next rank starts its own
    report.seconds = time.perf_counter() - started
    report.tokens = int(counts.sum())
    report.unique_tokens = int((counts > 0).sum())
    report.eos_share = float(counts[tokenizer.eos_id] / max(report.tokens, 1))
    top = np.argsort(counts)[::-1][:TOP_K]
    report.top_tokens = [
        {"id": int(i), "text": tokenizer.decode([int(i)]), "share": float(counts[i] / report.tokens)}
        for i in top
        if counts[i] > 0
    ]
    report.top_share = float(sum(t["share"] for t in report.top_tokens))
    report.boundary_share = boundary / max(report.windows, 1)
    return report


def verify_shard_checksums(location: str) -> str:
    """Full sha256 verification of every shard file of a prepared folder (raises a UserError naming a bad file)."""
    from tokenmill.data.shards import SPLITS, open_shards, read_manifest

    manifest = read_manifest(location)
    files = 0
    for split in SPLITS:
        if manifest["splits"][split]["shards"]:
            files += 2 * len(open_shards(location, split, None, verify="full").shards)
    return f"ok ({files} files, sha256)"

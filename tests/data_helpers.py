"""Small local corpora in the Hub datasets' own schemas, and configs, for the data tests (no network)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tokenmill.config import Config

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "that",
    "with",
    "as",
    "on",
    "by",
    "this",
    "it",
    "from",
    "data",
    "model",
    "token",
    "train",
    "loss",
]
DOC_ID = re.compile(r"<([a-z]+\d{5})>")


def make_docs(n: int, prefix: str = "d", seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    """Documents with a unique tag "<prefix00042>" at the start, of varied length."""
    rng = random.Random(seed)
    return [
        f"<{prefix}{i:05d}> " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def fineweb_rows(docs: list[str]) -> list[dict]:
    """Rows with FineWeb-Edu's columns (text, id, dump, url, file_path, language, language_score, token_count,
    score, int_score)."""
    return [
        {
            "text": t,
            "id": f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{i}",
            "file_path": f"s3://commoncrawl/crawl-data/{i}.warc.gz",
            "language": "en",
            "language_score": 0.97,
            "token_count": len(t.split()),
            "score": 3.1,
            "int_score": 3,
        }
        for i, t in enumerate(docs)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in fineweb_rows(docs):
            row[field] = row.pop("text")
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 64) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(fineweb_rows(docs)), path, row_group_size=row_group_size)
    return path


def make_cfg(
    sources: list[str],
    seq_len: int = 32,
    batch: int = 4,
    shuffle: int = 8,
    workers: int = 0,
    eval_fraction: float | None = 0.0,
    seed: int = 1234,
    bos_aligned_eval: bool = False,
    eval_sources: list[str] | None = None,
    shuffle_documents: bool = True,
    stream: bool = False,
    document_buffer: int = 1024,
) -> Config:
    cfg = Config()
    cfg.data.sources = list(sources)
    cfg.data.eval_sources = list(eval_sources or [])
    cfg.data.shuffle_documents = shuffle_documents
    cfg.data.stream_local_files = stream
    cfg.data.document_buffer = document_buffer
    cfg.data.shuffle_buffer = shuffle
    cfg.data.num_workers = workers
    cfg.data.eval_fraction = eval_fraction
    cfg.data.bos_aligned_eval = bos_aligned_eval
    cfg.train.seq_len = seq_len
    cfg.train.micro_batch_size = batch
    cfg.train.seed = seed
    return cfg.validate()


def doc_tags(text: str) -> set[str]:
    return set(DOC_ID.findall(text))

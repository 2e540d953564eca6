"""Data parallel ranks read disjoint windows (tokenmill.data.loader.build_loader with rank / world_size)."""

from __future__ import annotations

import pytest

from data_helpers import make_docs, write_jsonl
from tokenmill.config import Config


def _cfg(source: str) -> Config:
    cfg = Config()
    cfg.data.sources = [source]
    cfg.data.tokenizer = "byte"
    cfg.data.eval_fraction = 0.1
    cfg.train.seq_len = 16
    cfg.train.micro_batch_size = 2
    return cfg.validate()


def _rows(loader, n_batches: int) -> list[tuple[int, ...]]:
    rows = []
    for _, batch in zip(range(n_batches), loader):
        rows += [tuple(r) for r in batch["tokens"].tolist()]
    return rows


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    from tokenmill.cli import main

    root = tmp_path_factory.mktemp("data")
    docs = write_jsonl(root / "docs.jsonl", make_docs(300, max_words=60))
    assert (
        main(
            [
                "prepare",
                str(docs),
                "--tokenizer",
                "byte",
                "--out",
                str(root / "shards"),
                "--workers",
                "1",
                "--no-progress",
                "--eval-fraction",
                "0.1",
            ]
        )
        == 0
    )
    return {"text": str(docs), "shards": str(root / "shards")}


@pytest.mark.parametrize("kind", ["text", "shards"])
def test_two_ranks_read_disjoint_windows(sources, kind, tmp_path):
    from tokenmill.data.loader import build_loader
    from tokenmill.data.tokenizer import build_tokenizer

    cfg = _cfg(sources[kind])
    tok = build_tokenizer(cfg.data, tmp_path / "tok")
    r0 = _rows(build_loader(cfg, tok, "train", 0, 2), 5)
    r1 = _rows(build_loader(cfg, tok, "train", 1, 2), 5)
    assert len(r0) == len(r1) == 10
    assert not set(r0) & set(r1)
    if kind == "shards":
        # one global window order: per step, 2 ranks read exactly what one process accumulates
        single = _rows(build_loader(cfg, tok, "train", 0, 1), 10)
        assert set(single) == set(r0) | set(r1)

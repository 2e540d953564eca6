"""The eval loader: one finite, deterministic pass over the eval set, cut into the same windows on any world size.

The eval set is `data.eval_sources` (every document, whole) when given, else the documents of `data.sources`
that the hash split holds out (`data.eval_fraction`). Every rank reads the whole set in natural order
(several sources interleaved by their weights with a seeded draw, so a partial evaluation is a fair sample),
packs it into one stream of windows of seq_len + 1 tokens, and from each complete group of world_size
consecutive windows keeps window `rank`. Hence:
- the windows do not depend on the world size: 1 rank and N ranks evaluate the same windows, except the last
  < world_size windows (an incomplete group) and the final < seq_len + 1 tokens, which are left out;
- every rank gets the same number of windows, so the same number of batches: no rank waits in a sharded
  forward that another rank never runs;
- each `iter()` starts over, so every evaluation sees the same batches; iteration ends when the set is exhausted.

A pre-tokenized shards folder as the eval set gives its windows in file order (a window never crosses a shard
file): its eval split when it is also the training folder, else all its windows (train and eval splits).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.data.formats import build_packer, format_identity, open_sources
from tokenmill.data.mixture import Mixture, SourceCursor, parse_sources
from tokenmill.data.quality import add_counts
from tokenmill.data.shards import SPLITS, is_shard_dir, open_shards, read_manifest
from tokenmill.data.sources import Source
from tokenmill.data.state import make_state, same_layout
from tokenmill.errors import UserError

READ_WINDOWS = 64  # shard windows read per call


Window = dict[str, torch.Tensor]  # one row of a batch: "tokens", "doc_ids" and, for SFT, "targets"


class TextWindows:
    """The eval set of text sources (documents or SFT examples, as data.format says) as one window stream:
    documents in natural order, interleaved by weight."""

    def __init__(
        self, sources: list[Source], weights: list[float], cfg: Any, tokenizer: Any, split: str, eval_fraction: float
    ) -> None:
        cursors = [SourceCursor(src, i, 0, 1, split, eval_fraction, None, epochs=1) for i, src in enumerate(sources)]
        self.mixture = Mixture(cursors, weights, cfg.train.seed, 0)
        self.packer = build_packer(
            cfg.data.format, tokenizer, cfg.train.seq_len + 1, bos_aligned=cfg.data.bos_aligned_eval
        )

    def _next_doc(self) -> str | None:
        item = self.mixture.next_doc()
        return None if item is None else item[1]

    def windows(self) -> Iterator[Window]:
        while (window := self.packer.next_window(self._next_doc)) is not None:
            yield {key: value[0] for key, value in self.packer.batch([window]).items()}

    def counts(self) -> dict[str, dict[str, int]]:
        return {c.source.name: c.doc_counts().to_dict() for c in self.mixture.cursors}

    def close(self) -> None:
        self.mixture.close()


class ShardWindows:
    """The eval set of a shards folder as one window stream, split after split, shard after shard."""

    def __init__(self, folder: str, splits: list[str], tokenizer: Any, seq_len: int) -> None:
        from tokenmill.data.shard_loader import WindowReader

        self.readers = [WindowReader(open_shards(folder, split, tokenizer), seq_len + 1) for split in splits]

    def windows(self) -> Iterator[Window]:
        for reader in self.readers:
            for start in range(0, reader.n_windows, READ_WINDOWS):
                tokens, doc_ids = reader.read(np.arange(start, min(start + READ_WINDOWS, reader.n_windows)))
                for row, ids in zip(torch.from_numpy(tokens), torch.from_numpy(doc_ids), strict=True):
                    yield {"tokens": row, "doc_ids": ids}

    def counts(self) -> dict[str, dict[str, int]]:
        return {}  # counted by `prepare`, see the shard loader's stats

    def close(self) -> None:
        """Nothing to release early (file descriptors close with the readers)."""


class EvalSetLoader:
    """A finite `BatchLoader` over the eval set (see the module docstring); `iter()` always starts over."""

    def __init__(
        self, open_windows: Any, describe: str, batch_size: int, rank: int, world_size: int, identity: dict[str, Any]
    ) -> None:
        self.open_windows = open_windows  # () -> TextWindows | ShardWindows, a fresh pass each call
        self.describe, self.batch_size = describe, batch_size
        self.rank, self.world_size = rank, world_size
        self.identity = identity
        self.layout = {"rank": rank, "world_size": world_size, "batch_size": batch_size}
        self._windows: TextWindows | ShardWindows | None = None
        self._counts: dict[str, dict[str, int]] = {}
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()
        source = self._windows = self.open_windows()
        group: list[Window] = []
        rows: list[Window] = []
        groups = 0
        try:
            for window in source.windows():
                group.append(window)
                if len(group) < self.world_size:
                    continue
                rows.append(group[self.rank])  # the whole group is read: every rank keeps the same count
                group, groups = [], groups + 1
                if len(rows) == self.batch_size:
                    yield self._batch(rows)
                    rows = []
            if groups == 0:
                raise UserError(
                    f"the eval set ({self.describe}) holds fewer than {self.world_size} windows of "
                    f"{self.identity['seq_len'] + 1} tokens (one per rank); use a larger eval set or "
                    f"a shorter train.seq_len"
                )
            if rows:
                yield self._batch(rows)  # the last batch may be short, equally on every rank
        finally:
            self.close()

    def _batch(self, rows: list[Window]) -> dict[str, torch.Tensor]:
        self.batches += 1
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def stats(self) -> dict[str, Any]:
        """Batches handed out, and per source the documents that lost text (counted by the last pass)."""
        counts = self._windows.counts() if self._windows is not None else self._counts
        return {"batches": self.batches, "sources": counts}

    def close(self) -> None:
        """End the current pass and release its readers."""
        if self._windows is not None:
            self._counts = add_counts({}, self._windows.counts())
            self._windows.close()
            self._windows = None

    def state_dict(self) -> dict[str, Any]:
        """An eval pass always starts over, so the state holds only what identifies the set."""
        return make_state("eval", self.identity, self.layout)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same_layout(state, "eval", self.identity, self.layout)


def build_eval_loader(cfg: Any, tokenizer: Any, rank: int, world_size: int) -> EvalSetLoader:
    """The eval loader of this rank: data.eval_sources when set, else the hash-held-out part of data.sources."""
    data = cfg.data
    train_specs = parse_sources(data.sources)
    holdout = data.holdout_fraction()
    if data.eval_sources:
        specs, split, fraction = parse_sources(data.eval_sources), "all", 0.0
        describe = f"data.eval_sources={list(data.eval_sources)}"
    elif holdout > 0:
        specs, split, fraction = train_specs, "eval", holdout
        describe = f"the documents data.eval_fraction={holdout} holds out of data.sources"
    else:
        raise UserError(
            "there is no eval set: data.eval_fraction is 0 and data.eval_sources is empty; set "
            "data.eval_sources=[val.jsonl] or data.eval_fraction=0.02"
        )
    identity = {
        "eval_sources": [f"{s.location}:{s.weight:.6g}" for s in specs],
        "split": split,
        "eval_fraction": fraction,
        "text_field": data.text_field,
        "tokenizer": tokenizer.hash,
        "seq_len": int(cfg.train.seq_len),
        "bos_aligned": bool(data.bos_aligned_eval),
        **format_identity(data),
    }
    shard_specs = [s for s in specs if is_shard_dir(s.location)]
    if not shard_specs:
        # opened once, here: a bad eval source fails at set-up, in one line; each pass opens new readers
        sources = open_sources(data, tokenizer, specs)

        def open_windows() -> TextWindows:
            return TextWindows(sources, [s.weight for s in specs], cfg, tokenizer, split, fraction)

        return EvalSetLoader(open_windows, describe, cfg.train.micro_batch_size, rank, world_size, identity)
    if len(specs) > 1:
        raise UserError("a pre-tokenized shards folder must be the only data.eval_sources entry")
    folder = specs[0].location
    manifest = read_manifest(folder)
    same_folder = any(is_shard_dir(s.location) and _same_path(s.location, folder) for s in train_specs)
    splits = ["eval"] if split == "eval" or same_folder else [s for s in SPLITS if manifest["splits"][s]["shards"]]
    ShardWindows(folder, splits, tokenizer, cfg.train.seq_len)  # checks manifest, tokenizer and files now

    def open_shard_windows() -> ShardWindows:
        return ShardWindows(folder, splits, tokenizer, cfg.train.seq_len)

    describe = f"{folder} ({'+'.join(splits)} split{'s' if len(splits) > 1 else ''})"
    return EvalSetLoader(
        open_shard_windows,
        describe,
        cfg.train.micro_batch_size,
        rank,
        world_size,
        identity | {"split": "+".join(splits)},
    )


def _same_path(a: str, b: str) -> bool:
    from pathlib import Path

    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

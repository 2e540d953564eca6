"""The shard loader: fixed token windows read from prepared shards, disjoint per (rank, worker), resumable.

Windows. A split's shards are cut into non-overlapping windows of L = seq_len + 1 tokens (a window never
crosses a shard file; the < L tokens left at a shard's end are skipped). Window w of shard k covers tokens
[w*L, (w+1)*L) of that shard.

Order. Epoch e visits the windows in the permutation `default_rng([seed, e]).permutation(n)` (identity
when shuffling is off; a full permutation is a perfect shuffle, so no shuffle buffer is needed). The
C = world_size * workers readers share it: reader c = rank * workers + worker takes positions
base + c, base + c + C, base + c + 2C, ... so the readers are disjoint and together read every window of
the epoch once. Every reader takes the same number of windows per epoch, (n - base) // C; the remaining
< C positions are skipped that epoch, so ranks always have the same number of batches and never wait on
one another. Batches of B windows run on across epoch ends.

State. A reader's position is (epoch, base, consumed). Each batch carries its reader's position after it;
the loader records it in the main process, so `state_dict()` is exact whatever the workers prefetched.
- Same world size and worker count: the next batch after `load_state_dict` is exactly the one an
  uninterrupted loader would give (also across epochs; the worker that was next is still next).
- Another world size or worker count: every reader restarts at the global cursor
  base + C_old * max(consumed) of the furthest epoch, which lies past every window already read (all
  ranks consume in lockstep, so one rank's state suffices); at most C_old * B windows of that epoch
  are skipped, none is repeated.

Memory. Pages of an np.memmap stay in the process's resident set once touched, so slicing windows from
a map grows RSS towards the file size over a long run (nanoGPT #287; here a 4 KiB window fault maps in
~100 KiB through fault-around and large page-cache folios, measured). Token windows are therefore read
with one positioned read (`os.preadv`) per window into the batch buffer: the page cache still serves
them, but nothing stays mapped, and it measured faster than slicing a map (benchmarks/data_throughput.py).
The small document indexes are memory-mapped (shared between workers) and re-opened every
REMAP_WINDOWS windows, which bounds what binary search leaves resident.

doc_ids. Per row, the index of the document each position belongs to (0 for the row's first), from the
shard's document-start index: a 1 at each document start inside the window, then a cumulative sum.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenmill.data.shards import ShardSet
from tokenmill.data.state import make_state, same_layout
from tokenmill.errors import UserError

REMAP_WINDOWS = 8192  # windows between re-opening the memory-mapped document indexes (bounds resident memory)


class WindowReader:
    """Reads whole windows (by global window index) and their doc_ids from a split's shards."""

    def __init__(self, shard_set: ShardSet, window: int):
        self.shard_set, self.window = shard_set, window
        self.itemsize = shard_set.dtype.itemsize
        self.vocab_size = int(shard_set.manifest["tokenizer"]["vocab_size"])
        counts = np.array([s.tokens // window for s in shard_set.shards], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(counts)])  # first global window of each shard
        self.n_windows = int(self.cum[-1])
        self._fds: dict[int, int] = {}
        self._index: dict[int, np.ndarray] = {}
        self._since_remap = 0

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own files
        return {**self.__dict__, "_fds": {}, "_index": {}, "_since_remap": 0}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, k: int) -> int:
        if k not in self._fds:
            self._fds[k] = os.open(self.shard_set.shards[k].path, os.O_RDONLY)
        return self._fds[k]

    def _doc_starts(self, k: int) -> np.ndarray:
        if k not in self._index:
            shard = self.shard_set.shards[k]
            try:
                mapped = np.load(shard.index_path, mmap_mode="r")
            except (ValueError, OSError) as err:
                raise self._changed(shard.index_path, f"unreadable ({err})") from None
            # cheap checks (two entries): every shard's first document starts at 0, its last inside the shard
            if mapped.shape != (shard.docs,) or (shard.docs and (mapped[0] != 0 or mapped[-1] >= shard.tokens)):
                raise self._changed(shard.index_path, "not this shard's document index")
            self._index[k] = mapped.view(np.ndarray)  # same pages, without np.memmap's per-slice overhead
        return self._index[k]

    def _changed(self, path: Any, what: str) -> UserError:
        return UserError(
            f"{path} is {what}: the file changed after prepare (overwritten in place?); run "
            f"`tokenmill data check` to verify the checksums, or re-run `tokenmill prepare ... "
            f"--out {self.shard_set.folder} --overwrite`"
        )

    def read(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,) global window indices -> tokens (B, L) int64 and doc_ids (B, L) int64."""
        L, dtype = self.window, self.shard_set.dtype
        raw = np.empty((len(windows), L), dtype=dtype)
        marks = np.zeros((len(windows), L), dtype=np.int64)
        shard_of = np.searchsorted(self.cum, windows, side="right") - 1
        offsets = (windows - self.cum[shard_of]) * L
        for i, (k, off) in enumerate(zip(shard_of.tolist(), offsets.tolist(), strict=True)):
            if os.preadv(self._fd(k), [raw[i]], off * self.itemsize) != L * self.itemsize:
                raise UserError(
                    f"checksum error: {self.shard_set.shards[k].path} is shorter than its manifest says "
                    f"(truncated while in use?); re-run `tokenmill prepare ... --overwrite`"
                )
            starts = self._doc_starts(k)
            lo = int(np.searchsorted(starts, off, side="right"))  # first document starting after the row start
            hi = int(np.searchsorted(starts, off + L, side="left"))
            if hi > lo:
                inside = starts[lo:hi] - off
                if inside.min() <= 0 or inside.max() >= L:  # only an unsorted (damaged) index can do this
                    raise self._changed(self.shard_set.shards[k].index_path, "not a sorted document index")
                marks[i, inside] = 1
        # One vectorised max per batch: an id outside the vocabulary would otherwise be an IndexError in the
        # embedding, mid-run. Same-size damage with in-vocabulary ids needs the sha256 pass of `data check`.
        if len(windows) and int(raw.max()) >= self.vocab_size:
            row = int(np.argmax(raw.max(axis=1) >= self.vocab_size))
            bad = int(raw[row].max())
            raise self._changed(
                self.shard_set.shards[int(shard_of[row])].path,
                f"damaged: it holds token id {bad}, outside the tokenizer's {self.vocab_size} ids",
            )
        np.cumsum(marks, axis=1, out=marks)
        self._since_remap += len(windows)
        if self._since_remap >= REMAP_WINDOWS:
            self._index.clear()  # unmapping releases the index pages binary search touched
            self._since_remap = 0
        return raw.astype(np.int64), marks  # the only per-token work: the read and one widening copy


class ShardDataset(IterableDataset):
    """The batches of one rank; inside DataLoader workers each worker is its own reader (see module doc)."""

    def __init__(
        self, reader: WindowReader, batch_size: int, rank: int, world_size: int, workers: int, seed: int, shuffle: bool
    ):
        self.reader, self.batch_size, self.rank, self.world_size = reader, batch_size, rank, world_size
        self.workers, self.seed, self.shuffle = workers, seed, shuffle
        self.positions = [(0, 0, 0)] * workers  # per logical worker: (epoch, base, consumed)
        self.shift = 0  # physical worker p plays logical worker (p + shift) % workers, so the next one is still next
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def order(self, epoch: int) -> np.ndarray:
        """The window permutation of an epoch (cached: one at a time)."""
        if self._perm is None or self._perm[0] != epoch:
            n = self.reader.n_windows
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n, dtype=np.int64)
            )
            self._perm = (epoch, perm)
        return self._perm[1]

    def batches(self, worker: int) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]]:
        """Endless (tokens, doc_ids, position after this batch) for one logical worker of this rank."""
        epoch, base, consumed = self.positions[worker]
        reader_id, readers, n = self.rank * self.workers + worker, self.readers, self.reader.n_windows
        while True:
            parts, need = [], self.batch_size
            while need:
                per_reader = (n - base) // readers
                if consumed >= per_reader:
                    epoch, base, consumed = epoch + 1, 0, 0
                    continue
                take = min(need, per_reader - consumed)
                pos = base + reader_id + readers * np.arange(consumed, consumed + take, dtype=np.int64)
                parts.append(self.order(epoch)[pos])
                consumed, need = consumed + take, need - take
            windows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            tokens, doc_ids = self.reader.read(windows)
            yield tokens, doc_ids, (epoch, base, consumed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.shift) % self.workers
        for tokens, doc_ids, position in self.batches(worker):
            yield {
                "tokens": torch.from_numpy(tokens),
                "doc_ids": torch.from_numpy(doc_ids),
                "_position": torch.tensor([worker, *position], dtype=torch.long),
            }


class ShardLoader:
    """Endless iterator of {"tokens", "doc_ids"} (B, seq_len + 1) training batches with exact `state_dict` resume;
    `iter()` continues where the last batch left off. It follows the conventions of `tokenmill.data.state`:
    the windows' identity (shards content, seq_len, seed, shuffle) is refused on change, another layout
    (rank, world size, workers) resumes at the global cursor with a warning."""

    def __init__(
        self,
        shard_set: ShardSet,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.num_workers = num_workers
        reader = WindowReader(shard_set, seq_len + 1)
        self.dataset = ShardDataset(reader, batch_size, rank, world_size, max(num_workers, 1), seed, shuffle)
        if reader.n_windows < self.dataset.readers:
            raise UserError(
                f"{shard_set.folder} {shard_set.split} split has {reader.n_windows} windows of "
                f"{seq_len + 1} tokens, fewer than the {self.dataset.readers} readers (ranks x workers); "
                f"use a shorter seq_len, fewer workers or more data"
            )
        self.identity = {
            "dataset": shard_set.fingerprint,
            "split": shard_set.split,
            "seq_len": seq_len,
            "seed": seed,
            "shuffle": shuffle,
            "windows": reader.n_windows,
        }
        self.layout = {"rank": rank, "world_size": world_size, "workers": self.dataset.workers}
        self._next_worker = 0
        self._it: Iterator[dict[str, torch.Tensor]] | None = None
        self.batches = 0

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            ds = self.dataset
            ds.shift = self._next_worker
            self._it = iter(
                ds
                if self.num_workers == 0
                else DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=4,
                    pin_memory=torch.cuda.is_available(),
                )
            )
        batch = next(self._it)
        worker, epoch, base, consumed = batch.pop("_position").tolist()
        self.dataset.positions[worker] = (epoch, base, consumed)
        self._next_worker = (worker + 1) % self.dataset.workers
        self.batches += 1
        return batch

    def stats(self) -> dict[str, Any]:
        """Batches handed out by this loader object, and the documents `prepare` counted as losing text."""
        return {
            "batches": self.batches,
            "sources": {},
            "prepared": prepared_counts(self.dataset.reader.shard_set.manifest),
        }

    def close(self) -> None:
        """Stop worker processes (a later `next` starts them again from the recorded state)."""
        self._it = None

    def state_dict(self) -> dict[str, Any]:
        return make_state(
            "shards",
            self.identity,
            self.layout,
            next_worker=self._next_worker,
            positions=[list(p) for p in self.dataset.positions],
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        positions = [tuple(int(v) for v in p) for p in state.get("positions", [])] if isinstance(state, dict) else []
        if same_layout(state, "shards", self.identity, self.layout):
            ds.positions, self._next_worker = positions, int(state["next_worker"])
        else:
            old = state["layout"]
            old_readers = int(old["world_size"]) * int(old["workers"])
            epoch, cursor = max((e, b + old_readers * c) for e, b, c in positions)
            ds.positions, self._next_worker = [(epoch, cursor, 0)] * ds.workers, 0
        self._it = None


def prepared_counts(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{source: counts} of documents that lost text, as `prepare` recorded them (empty for older folders)."""
    counts = manifest.get("documents")
    return {str(manifest["settings"].get("source", "?")): counts} if isinstance(counts, dict) else {}

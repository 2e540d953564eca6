"""The data-loader contract (`BatchLoader`), the text-stream training loader, and `build_loader`, which picks one.

Three loaders satisfy `BatchLoader`: this module's `Loader` (text sources, tokenized on the fly), the shard
loader (`shard_loader.py`, pre-tokenized folders) and the eval-set loader (`eval_set.py`). All share the state
conventions of `state.py` (format, kind, identity refused on change, layout resumed without repeats).

Pipeline of one (rank, worker) slot:  sources -> Mixture -> Packer -> WindowBuffer -> batches of B windows.
`data.format` picks the packer (formats.py): documents cut into windows, or whole SFT examples per window.

Sharding: slot = rank * num_workers + worker, n_slots = world_size * num_workers; each source gives every
slot a disjoint part of each epoch (sources.py, streams.py), and together the slots read every document.
Training never runs dry: each source cycles its epochs forever, so every rank yields batches for as long
as the trainer asks and uneven shards cannot hang a collective. A slot with no documents at all fails
loudly at its first epoch instead of spinning.

Threads: with `num_workers=0` a background thread makes the batches (prefetch.py), so tokenizing overlaps
the training step; the batches are the same as without it.

Resume: `Loader.state_dict()` holds torchdata's StatefulDataLoader state, which carries each worker's
`TokenStream.state_dict()` (source positions and epochs, document buffers, mixture draws, packing buffer,
window buffer and its RNG counter), plus the batches the background thread made but the trainer has not
taken yet, which a resumed loader hands out first. Loading it into a loader with the same layout yields exactly the
batches the old loader would have. With another layout it starts every slot at the furthest source
position any slot reached (`cursor`, merged over workers and, under torch.distributed, over ranks), so no
document is repeated; documents and windows that were buffered are skipped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokenmill.data.formats import build_packer, format_identity, open_sources
from tokenmill.data.mixture import Mixture, SourceCursor, merge_cursors, parse_sources
from tokenmill.data.prefetch import Prefetcher
from tokenmill.data.quality import add_counts
from tokenmill.data.shards import is_shard_dir
from tokenmill.data.shuffle import WindowBuffer
from tokenmill.data.sources import Source
from tokenmill.data.state import make_state, same_layout
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

SNAPSHOT_EVERY = 32  # batches between worker-state snapshots; resume replays at most this many (exactly)
PREFETCH_BATCHES = 4  # batches the background thread makes ahead without workers (prefetch_factor with them)


@runtime_checkable
class BatchLoader(Protocol):
    """What the trainer needs from a data loader: batches, an exact resume point, shutdown, counters.

    Iterating yields {"tokens": (B, T+1) int64, "doc_ids": (B, T+1) int64} and, when the data masks targets
    (SFT), "targets": (B, T) int64 with IGNORE_INDEX where no loss is taken. `stats()` holds at least
    "batches" and "sources" ({source name: `quality.DocCounts` fields} of the documents this rank read; a
    shard loader reads no documents and reports what `prepare` counted under "prepared");
    `quality.loader_problem_lines(stats)` turns them into the lines to print.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class SlotPipeline:
    """Everything one slot needs to produce batches, and its complete state."""

    def __init__(self, stream: TokenStream, slot: int, state: dict | None, start: list | None) -> None:
        s = stream
        source_states = (state or {}).get("mixture", {}).get("sources")
        if source_states is None and start is not None:  # another layout: start at the merged cursor
            source_states = [{"epoch": c["epoch"], "position": c["position"]} for c in start]
        seed = s.seed if s.shuffle_documents else None
        cursors = [
            SourceCursor(
                src,
                i,
                slot,
                s.n_slots,
                "train",
                s.eval_fraction,
                seed,
                s.epochs,
                state=source_states[i] if source_states else None,
                doc_buffer=s.document_buffer,
            )
            for i, src in enumerate(s.sources)
        ]
        self.mixture = Mixture(cursors, s.weights, s.seed, 2 * slot, state=(state or {}).get("mixture"))
        self.packer = build_packer(s.data_format, s.tokenizer, s.seq_len + 1)
        self.shuffle = WindowBuffer(s.shuffle_buffer, self.packer.row_shape, s.seed, 2 * slot + 1)
        self.batch_size = s.batch_size
        self.batches = 0
        if state:
            self.packer.load_state_dict(state["packer"])
            if s.shuffle_buffer:
                self.shuffle.load_state_dict(state["shuffle"])
            self.batches = int(state["batches"])

    def _next_doc(self) -> str | None:
        item = self.mixture.next_doc()
        return None if item is None else item[1]

    def _next_window(self) -> torch.Tensor | None:
        return self.packer.next_window(self._next_doc)

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        rows = []
        while len(rows) < self.batch_size:
            window = self.shuffle.next(self._next_window)
            if window is None:
                break  # finite run only: the last batch may be short
            rows.append(window)
        if not rows:
            return None
        self.batches += 1
        return self.packer.batch(rows)

    def stats(self) -> dict[str, Any]:
        counts = {c.source.name: c.doc_counts().to_dict() for c in self.mixture.cursors}
        return {**self.packer.stats(), "batches": self.batches, "sources": counts}

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
            "shuffle": self.shuffle.state_dict(),
            "batches": self.batches,
        }

    def close(self) -> None:
        self.mixture.close()


class TokenStream(IterableDataset):
    """An IterableDataset of ready batches; each dataloader worker runs its own slot of the stream."""

    def __init__(
        self,
        sources: list[Source],
        weights: list[float],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        shuffle_documents: bool,
        document_buffer: int,
        eval_fraction: float,
        epochs: int | None,
        data_format: str = "text",
    ) -> None:
        self.sources, self.weights, self.tokenizer = sources, weights, tokenizer
        self.data_format = data_format  # data.format: picks the packer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.n_slots = world_size * max(1, num_workers)
        self.seed, self.shuffle_buffer, self.eval_fraction = seed, shuffle_buffer, eval_fraction
        self.shuffle_documents, self.document_buffer = shuffle_documents, document_buffer
        self.epochs = epochs
        self._pending: dict | None = None  # exact state to start the next iteration from
        self.start_cursor: list | None = None  # merged cursor to start from (different layout)
        self._pipe: SlotPipeline | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned workers before they iterate: the live pipeline (open file streams) stays here.
        return {k: v for k, v in self.__dict__.items() if k != "_pipe"} | {"_pipe": None}

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def __iter__(self):
        worker = self._worker()
        slot = self.rank * max(1, self.num_workers) + worker
        state, self._pending = self._pending, None
        pipe = SlotPipeline(self, slot, state, self.start_cursor)
        self._pipe = pipe
        try:
            while True:
                batch = pipe.next_batch()
                if batch is None:
                    return
                # Position after this batch, for no-repeat resume on another layout (stripped by Loader).
                batch["_cursor"] = {"worker": worker, "sources": pipe.mixture.cursor(), "stats": pipe.stats()}
                yield batch
        finally:
            pipe.close()

    def state_dict(self) -> dict[str, Any]:
        if self._pipe is not None:
            return self._pipe.state_dict()
        return self._pending if self._pending is not None else {"fresh": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pipe = None
        self._pending = None if state.get("fresh") else state


def _one_line(err: UserError) -> str:
    """A UserError re-raised from a dataloader worker carries the worker traceback: keep its last line."""
    text = str(err).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split("UserError: ", 1)[-1]


class Loader:
    """The training stream of text sources: one continuing, infinite stream with exact `state_dict()` resume
    (a new `iter()` continues where the last one stopped)."""

    def __init__(self, stream: TokenStream, identity: dict[str, Any]) -> None:
        self.stream = stream
        self.identity = identity
        self.layout = {
            "rank": stream.rank,
            "world_size": stream.world_size,
            "num_workers": stream.num_workers,
            "seq_len": stream.seq_len,
            "batch_size": stream.batch_size,
            "shuffle_buffer": stream.shuffle_buffer,
            "document_buffer": stream.document_buffer,
        }
        self._dl = self._dataloader()
        self._it: Iterator | None = None
        self._ahead: list[dict[str, Any]] = []  # batches made before a checkpoint, handed out first after resume
        self._cursors: dict[int, list] = {}
        self._stats: dict[int, dict[str, Any]] = {}
        self._floor: list | None = None  # cursor loaded from a checkpoint

    def _dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        nw = self.stream.num_workers
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital in __init__
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(
                self.stream,
                batch_size=None,
                num_workers=nw,
                prefetch_factor=4 if nw else None,
                snapshot_every_n_steps=SNAPSHOT_EVERY,
                pin_memory=torch.cuda.is_available(),
                # own generator: iter() draws a worker base seed, which from the global
                # RNG would shift dropout after a resume (the resumed run calls iter()
                # after restoring RNG states) and make evals change training randomness
                generator=torch.Generator(),
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._it is None:
            it = iter(self._dl)
            if self.stream.num_workers == 0:
                it, self._ahead = Prefetcher(it, PREFETCH_BATCHES, ahead=self._ahead), []
            self._it = it
        it = self._it
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as err:
                self.close()
                raise UserError(_one_line(err)) from None
            except BaseException:
                self.close()
                raise
            cursor = batch.pop("_cursor")
            self._cursors[cursor["worker"]] = cursor["sources"]
            self._stats[cursor["worker"]] = cursor["stats"]
            yield batch

    def close(self) -> None:
        """Stop the dataloader workers now (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        if isinstance(it, Prefetcher):
            it.close()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def stats(self) -> dict[str, Any]:
        """This rank's counters: documents packed, batches, and per source the documents that lost text."""
        sources: dict[str, dict[str, int]] = {}
        for s in self._stats.values():
            sources = add_counts(sources, s["sources"])
        counters = {key for s in self._stats.values() for key, value in s.items() if isinstance(value, int)}
        totals = {key: sum(s.get(key, 0) for s in self._stats.values()) for key in sorted(counters)}
        return {"documents": 0, "batches": 0, **totals, "sources": sources}

    def cursor(self) -> list | None:
        """Furthest source positions of this rank's workers (all ranks under torch.distributed)."""
        cursor = merge_cursors([self._floor, *self._cursors.values()])
        import torch.distributed as dist

        world = self.stream.world_size
        if world > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, cursor)  # collective: state_dict() must run on every rank
            cursor = merge_cursors(gathered)
        return cursor

    def state_dict(self) -> dict[str, Any]:
        it = self._it
        if not isinstance(it, Prefetcher):
            return self._state(list(self._ahead))
        with it.paused() as made:  # the thread is between two batches: the dataloader state matches `made`
            return self._state([dict(batch) for batch in made])

    def _state(self, ahead: list[dict[str, Any]]) -> dict[str, Any]:
        return make_state(
            "text", self.identity, self.layout, dataloader=self._dl.state_dict(), cursor=self.cursor(), ahead=ahead
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        exact = same_layout(state, "text", self.identity, self.layout)
        self.close()  # the thread stops before the dataloader it reads is replaced
        self._cursors, self._stats = {}, {}
        self._floor = state.get("cursor")
        self._ahead = list(state.get("ahead", [])) if exact else []
        if exact:
            self._dl.load_state_dict(state["dataloader"])
            return
        self.stream.start_cursor = self._floor
        self._dl = self._dataloader()


def build_loader(
    cfg: Any,
    tokenizer: Tokenizer,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    *,
    epochs: int | None = None,
    num_workers: int | None = None,
) -> BatchLoader:
    """The loader for `split` ("train" or "eval") of this rank; see the module docstring for guarantees.

    Train reads data.sources (minus the documents held out by data.eval_fraction, see `holdout_fraction`).
    Eval reads data.eval_sources whole when set, else the held-out documents of data.sources; it is finite
    and every `iter()` starts it over (eval_set.py). `epochs` (tools and tests) stops training data after that
    many epochs of every source instead of cycling forever; `num_workers` overrides data.num_workers.
    """
    data, train = cfg.data, cfg.train
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if split == "eval":
        from tokenmill.data.eval_set import build_eval_loader

        return build_eval_loader(cfg, tokenizer, rank, world_size)
    specs = parse_sources(data.sources)
    workers = data.num_workers if num_workers is None else num_workers
    if any(is_shard_dir(s.location) for s in specs):
        if len(specs) > 1:
            raise UserError("a pre-tokenized shards folder must be the only data.sources entry")
        if data.format != "text":
            raise UserError(
                f"data.format={data.format} reads jsonl/parquet rows, not a pre-tokenized shards folder; "
                f"list the jsonl/parquet files in data.sources"
            )
        from tokenmill.data.shards import build_shard_loader

        return build_shard_loader(
            specs[0].location,
            tokenizer,
            "train",
            train.micro_batch_size,
            train.seq_len,
            rank,
            world_size,
            workers,
            train.seed,
            data.shuffle_buffer,
        )
    if workers > 0:
        # Workers are forked after the tokenizer may have run threads here; tokenize single-threaded per worker.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sources = open_sources(data, tokenizer, specs)
    holdout = data.holdout_fraction()
    stream = TokenStream(
        sources,
        [s.weight for s in specs],
        tokenizer,
        seq_len=train.seq_len,
        batch_size=train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        seed=train.seed,
        shuffle_buffer=data.shuffle_buffer,
        shuffle_documents=data.shuffle_documents,
        document_buffer=data.document_buffer,
        eval_fraction=holdout,
        epochs=epochs,
        data_format=data.format,
    )
    identity = {
        "sources": [f"{s.location}:{s.weight:.6g}" for s in specs],
        "text_field": data.text_field,
        "tokenizer": tokenizer.hash,
        "eval_fraction": holdout,
        "seed": int(train.seed),
        "shuffle_documents": bool(data.shuffle_documents),
        "stream_local_files": bool(data.stream_local_files),
        **format_identity(data),
    }
    return Loader(stream, identity)

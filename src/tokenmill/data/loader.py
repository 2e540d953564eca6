"""The training/eval data loader (SPEC D5, D6): sharding, shuffle buffer, batches, exact resume.

Pipeline of one (rank, worker) slot:  sources -> Mixture -> Packer -> ShuffleBuffer -> batches of B windows.

Sharding: slot = rank * num_workers + worker, n_slots = world_size * num_workers; a slot reads the
documents whose raw index within the epoch % n_slots == slot (sources.py), so slots are disjoint and
together cover every document. Training never runs dry: each source cycles its epochs forever, so every
rank yields batches for as long as the trainer asks and uneven shards cannot hang a collective.
A slot with no documents at all fails loudly at its first epoch instead of spinning.

Resume: `Loader.state_dict()` holds torchdata's StatefulDataLoader state, which carries each worker's
`TokenStream.state_dict()` (source positions and epochs, mixture draws, packing buffer, shuffle buffer
and its RNG counter). Loading it into a loader with the same world size, worker count, seq_len and batch
size yields exactly the batches the old loader would have. With another layout it starts every slot at
the furthest source position any slot reached (`cursor`, merged over workers and, under
torch.distributed, over ranks), so no document is repeated; windows that were buffered are skipped.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokenmill.data.mixture import Mixture, SourceCursor, merge_cursors, parse_sources, uniform
from tokenmill.data.packing import Packer, doc_ids_of
from tokenmill.data.sources import Source, open_source
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

SNAPSHOT_EVERY = 32  # batches between worker-state snapshots; resume replays at most this many (exactly)
STATE_FORMAT = 1


class ShuffleBuffer:
    """Keeps `size` windows and hands out a random one; its RNG is a counter (uniform(seed, stream, k))."""

    def __init__(self, size: int, window: int, seed: int, stream: int) -> None:
        self.size, self.seed, self.stream = size, seed, stream
        self.buf = torch.zeros((size, window), dtype=torch.int32)
        self.fill = 0
        self.draws = 0

    def next(self, produce: Any) -> torch.Tensor | None:
        if self.size == 0:
            return produce()
        while self.fill < self.size:
            window = produce()
            if window is None:
                break  # finite run: drain what is left
            self.buf[self.fill] = window
            self.fill += 1
        if self.fill == 0:
            return None
        j = int(uniform(self.seed, self.stream, self.draws) * self.fill)
        self.draws += 1
        out = self.buf[j].clone()
        self.fill -= 1
        self.buf[j] = self.buf[self.fill]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.buf[: self.fill].clone(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        windows = state["windows"]
        if self.size == 0 or windows.shape[0] > self.size or windows.shape[1:] != self.buf.shape[1:]:
            raise ValueError("shuffle-buffer state does not match this loader")
        self.fill = windows.shape[0]
        self.buf[: self.fill] = windows
        self.draws = int(state["draws"])


class SlotPipeline:
    """Everything one slot needs to produce batches, and its complete state."""

    def __init__(self, stream: TokenStream, slot: int, state: dict | None, start: list | None) -> None:
        s = stream
        n_slots = s.n_slots
        source_states = (state or {}).get("mixture", {}).get("sources")
        if source_states is None and start is not None:  # another layout: start at the merged cursor
            source_states = [{"epoch": c["epoch"], "position": c["position"]} for c in start]
        cursors = [SourceCursor(src, i, slot, n_slots, s.split, s.eval_fraction, s.seed, s.epochs,
                                state=source_states[i] if source_states else None, shuffle=s.split == "train")
                   for i, src in enumerate(s.sources)]
        self.mixture = Mixture(cursors, s.weights, s.seed, 2 * slot, state=(state or {}).get("mixture"))
        self.packer = Packer(s.tokenizer, s.seq_len + 1, bos_aligned=s.bos_aligned)
        self.shuffle = ShuffleBuffer(s.shuffle_buffer, s.seq_len + 1, s.seed, 2 * slot + 1)
        self.batch_size = s.batch_size
        self.eos = s.tokenizer.eos_id
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
        tokens = torch.stack(rows).to(torch.int64)  # (B, T+1)
        return {"tokens": tokens, "doc_ids": doc_ids_of(tokens, self.eos)}

    def close(self) -> None:
        """Stop the dataloader workers now (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def stats(self) -> dict[str, int]:
        sources = self.mixture.state_dict()["sources"]
        return {"documents": self.packer.documents, "replaced_chars": sum(c["replaced"] for c in sources),
                "empty_documents": sum(c["empty"] for c in sources), "batches": self.batches}

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self.mixture.state_dict(), "packer": self.packer.state_dict(),
                "shuffle": self.shuffle.state_dict(), "batches": self.batches}

    def close(self) -> None:
        self.mixture.close()


class TokenStream(IterableDataset):
    """An IterableDataset of ready batches; each dataloader worker runs its own slot of the stream."""

    def __init__(self, sources: list[Source], weights: list[float], tokenizer: Tokenizer, *, split: str,
                 seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int, seed: int,
                 shuffle_buffer: int, eval_fraction: float, bos_aligned: bool, epochs: int | None) -> None:
        self.sources, self.weights, self.tokenizer = sources, weights, tokenizer
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.n_slots = world_size * max(1, num_workers)
        self.seed, self.shuffle_buffer, self.eval_fraction = seed, shuffle_buffer, eval_fraction
        self.bos_aligned, self.epochs = bos_aligned, epochs
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
    """Iterable of {"tokens": (B, T+1) int64, "doc_ids": (B, T+1) int64} with exact `state_dict()` resume.

    Train: one continuing, infinite stream (a new `iter()` continues where the last one stopped).
    Eval: every `iter()` starts the eval split from its beginning, so each evaluation sees the same batches.
    """

    def __init__(self, stream: TokenStream, identity: dict[str, Any], restart_each_iter: bool) -> None:
        self.stream = stream
        self.identity = identity
        self.restart_each_iter = restart_each_iter
        self.layout = {"rank": stream.rank, "world_size": stream.world_size, "num_workers": stream.num_workers,
                       "seq_len": stream.seq_len, "batch_size": stream.batch_size,
                       "shuffle_buffer": stream.shuffle_buffer, "bos_aligned": stream.bos_aligned}
        self._dl = self._dataloader()
        self._it = None
        self._cursors: dict[int, list] = {}
        self._stats: dict[int, dict[str, int]] = {}
        self._floor: list | None = None  # cursor loaded from a checkpoint
        self.exhausted = False  # finite runs only (epochs=...): the stream ended

    def _dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        nw = self.stream.num_workers
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital in __init__
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(self.stream, batch_size=None, num_workers=nw,
                                      prefetch_factor=4 if nw else None, snapshot_every_n_steps=SNAPSHOT_EVERY,
                                      pin_memory=torch.cuda.is_available(),
                                      # own generator: iter() draws a worker base seed, which from the global
                                      # RNG would shift dropout after a resume (the resumed run calls iter()
                                      # after restoring RNG states) and make evals change training randomness
                                      generator=torch.Generator())

    def __iter__(self):
        if self._it is None or self.restart_each_iter:
            self._it = iter(self._dl)
        it = self._it
        while True:
            try:
                batch = next(it)
            except StopIteration:
                self.exhausted = True
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
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def stats(self) -> dict[str, int]:
        """Documents read, U+FFFD characters from undecodable bytes, empty documents skipped, batches."""
        keys = ("documents", "replaced_chars", "empty_documents", "batches")
        return {k: sum(s[k] for s in self._stats.values()) for k in keys}

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
        return {"format": STATE_FORMAT, "identity": dict(self.identity), "layout": dict(self.layout),
                "dataloader": self._dl.state_dict(), "cursor": self.cursor()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT}: "
                            f"it was written by another tokenmill version")
        changed = [k for k in self.identity if state["identity"].get(k) != self.identity[k]]
        if changed:
            k = changed[0]
            raise UserError(f"cannot resume the data stream: {k} changed ({state['identity'].get(k)!r} -> "
                            f"{self.identity[k]!r}); resume with the data settings of the checkpoint")
        self._it = None
        self._cursors, self._stats = {}, {}
        self._floor = state.get("cursor")
        if state["layout"] == self.layout:
            self._dl.load_state_dict(state["dataloader"])
            return
        diff = ", ".join(f"{k} {state['layout'].get(k)}->{v}" for k, v in self.layout.items()
                         if state["layout"].get(k) != v)
        warnings.warn(f"data: resuming on a different layout ({diff}): no document is repeated, but the "
                      f"resume is not batch-exact (buffered windows are skipped)", stacklevel=2)
        self.stream.start_cursor = self._floor
        self._dl = self._dataloader()


def _is_shards(location: str) -> bool:
    from pathlib import Path

    return (Path(location).expanduser() / "manifest.json").is_file()


def build_loader(cfg: Any, tokenizer: Tokenizer, split: str, rank: int = 0, world_size: int = 1, *,
                 epochs: int | None = None, num_workers: int | None = None) -> Any:
    """The loader for `split` ("train" or "eval") of this rank; see the module docstring for guarantees.

    `epochs` (tools and tests) stops after that many epochs of every source instead of cycling forever;
    `num_workers` overrides data.num_workers (eval always runs in the main process).
    """
    data, train = cfg.data, cfg.train
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if split == "eval" and data.eval_fraction <= 0:
        raise UserError("there is no eval split: data.eval_fraction is 0 (set it to e.g. 0.02)")
    specs = parse_sources(data.sources)
    workers = data.num_workers if num_workers is None else num_workers
    if split == "eval":
        workers = 0
    if any(_is_shards(s.location) for s in specs):
        if len(specs) > 1:
            raise UserError("a pre-tokenized shards folder must be the only data.sources entry")
        from tokenmill.data.shards import build_shard_loader

        return build_shard_loader(specs[0].location, tokenizer, split, train.micro_batch_size, train.seq_len,
                                  rank, world_size, workers, train.seed, data.shuffle_buffer if split == "train"
                                  else 0)
    if workers > 0:
        import os

        # Workers are forked after the tokenizer may have run threads here; tokenize single-threaded per worker.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sources = [open_source(s.location, data.text_field) for s in specs]
    stream = TokenStream(sources, [s.weight for s in specs], tokenizer, split=split, seq_len=train.seq_len,
                         batch_size=train.micro_batch_size, rank=rank, world_size=world_size, num_workers=workers,
                         seed=train.seed, shuffle_buffer=data.shuffle_buffer if split == "train" else 0,
                         eval_fraction=data.eval_fraction, bos_aligned=split == "eval" and data.bos_aligned_eval,
                         epochs=epochs)
    identity = {"sources": [f"{s.location}:{s.weight:.6g}" for s in specs], "text_field": data.text_field,
                "tokenizer": tokenizer.hash, "eval_fraction": float(data.eval_fraction), "seed": int(train.seed),
                "split": split}
    return Loader(stream, identity, restart_each_iter=split == "eval")

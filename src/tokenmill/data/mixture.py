"""Source mixtures, epochs and the train/eval split, for one (rank, worker) slot.

`data.sources` syntax: each entry is `LOCATION[:WEIGHT]`, e.g.
    ["fineweb-edu:0.45", "smollm-cosmopedia:0.25", "data/code.jsonl:0.2", "stdlib:0.1"]
The weight is the last `:`-separated part when it parses as a number; weights are relative (they are
normalised to sum to 1) and say what share of *documents* comes from each source. Either every entry
has a weight or none has (then all are equal). A single source needs no weight.

Sampling is deterministic: draw k of slot s picks a source from a counter-based uniform number
u(seed, s, k) (SplitMix64), so the mixture state is one integer, and a resumed run draws the same
sequence. Each source cycles through its epochs on its own (a small source repeats while a large one
is still in its first epoch). With document shuffling, every epoch of an indexed source is a permutation
drawn from (seed, epoch); a streaming source shuffles its file order per epoch and passes its documents
through a `DocumentBuffer`, which drains at the end of each epoch so an epoch still holds every document once.

Train/eval split: a document is held out for eval when a hash of its text (BLAKE2b) falls below
`data.eval_fraction`. The hash ignores the seed and position, so eval never shares a document with
train, in any run, on any number of ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tokenmill.data.quality import DocCounts
from tokenmill.data.rng import uniform
from tokenmill.data.shuffle import DocumentBuffer
from tokenmill.data.sources import DocReader, Source
from tokenmill.data.streams import merge_stream_positions
from tokenmill.errors import UserError

DOC_BUFFER_STREAM = 1 << 40  # RNG stream ids of document buffers: apart from the mixture's and window buffers'


def is_eval_doc(text: str, eval_fraction: float) -> bool:
    """Held-out test by content: the same document lands in the same split everywhere."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / float(1 << 64) < eval_fraction


@dataclass(frozen=True)
class SourceSpec:
    location: str
    weight: float


def parse_sources(entries: list[str]) -> list[SourceSpec]:
    """Split `LOCATION[:WEIGHT]` entries and normalise the weights."""
    if not entries:
        raise UserError("data.sources is empty: name at least one source, e.g. data.sources=[stdlib]")
    parsed: list[tuple[str, float | None]] = []
    for entry in entries:
        location, sep, tail = str(entry).rpartition(":")
        weight = None
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                location = str(entry)
        else:
            location = str(entry)
        if weight is not None and not weight > 0:
            raise UserError(f"data.sources entry {entry!r}: the weight must be > 0")
        parsed.append((location, weight))
    weighted = [w is not None for _, w in parsed]
    if len(parsed) > 1 and any(weighted) and not all(weighted):
        missing = [loc for loc, w in parsed if w is None]
        raise UserError(
            f"data.sources: give every source a weight or none ({', '.join(missing)} has none), "
            f"e.g. [a.jsonl:0.7, b.parquet:0.3]"
        )
    total = sum(w or 1.0 for _, w in parsed)
    return [SourceSpec(loc, (w or 1.0) / total) for loc, w in parsed]


class SourceCursor:
    """One source for one slot and one split: cycles epochs, keeps its position, filters by split.

    `split` "train" keeps the documents the hash split does not hold out, "eval" the held-out ones, "all"
    every document (a dedicated eval set). `seed` None reads every epoch in natural order (eval);
    `doc_buffer` documents shuffle a streaming source.
    """

    def __init__(
        self,
        source: Source,
        index: int,
        slot: int,
        n_slots: int,
        split: str,
        eval_fraction: float,
        seed: int | None,
        epochs: int | None,
        state: dict | None = None,
        doc_buffer: int = 0,
    ) -> None:
        self.source, self.index = source, index
        self.slot, self.n_slots = slot, n_slots
        self.split = split
        self.eval_fraction = eval_fraction
        # Salt the per-epoch order with the source index so two sources never share an order.
        self.seed = None if seed is None else seed * 1000003 + index
        self.epochs = epochs
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.docs_in_epoch = int(state.get("docs_in_epoch", 0))
        # True when this epoch is read from its start: only then does "no documents" mean an empty part.
        self.fresh_epoch = bool(state.get("fresh_epoch", state.get("position") is None))
        self.counts = DocCounts.from_dict(state.get("counts"))  # of finished epochs
        self.finished = epochs is not None and self.epoch >= epochs
        size = doc_buffer if source.streaming and self.seed is not None else 0
        self.buffer = DocumentBuffer(size, self.seed or 0, DOC_BUFFER_STREAM + slot)
        self.buffer.load_state_dict(state.get("buffer"))
        self._reader: DocReader | None = None
        self._start = state.get("position")

    def _open(self) -> DocReader:
        reader = self.source.reader(self.epoch, self.slot, self.n_slots, self._start, self.seed)
        self._start = None
        return reader

    def _next_kept(self) -> str | None:
        """The next document of this slot's split in reader order, or None at the end of the epoch."""
        for text in self._reader:
            if self.split == "all" or is_eval_doc(text, self.eval_fraction) == (self.split == "eval"):
                return text
        return None

    def next_doc(self) -> str | None:
        """The next document of this slot's split, moving to the next epoch as needed; None when finished."""
        while not self.finished:
            if self._reader is None:
                self._reader = self._open()
            text = self.buffer.next(self._next_kept)
            if text is not None:
                self.docs_in_epoch += 1
                return text
            self._end_epoch()
        return None

    def _end_epoch(self) -> None:
        reader, self._reader = self._reader, None
        reader.close()
        self.counts = self.counts + reader.counts
        # An endless stream must not spin on a slot without documents; a finite one (eval, tools) just ends.
        if self.docs_in_epoch == 0 and self.fresh_epoch and self.epochs is None:
            raise UserError(self._empty_message(reader.counts))
        self.epoch += 1
        self.docs_in_epoch = 0
        self.fresh_epoch = True
        self.finished = self.epochs is not None and self.epoch >= self.epochs

    def _empty_message(self, counts: DocCounts) -> str:
        split, name = self.split, self.source.name
        if counts.read > 0 and counts.null + counts.empty == counts.read:
            return (
                f"source {name}: none of the {counts.read:,} documents read has text ({counts.null:,} null or "
                f"not a string, {counts.empty:,} empty); check data.text_field and the data"
            )
        if counts.read > 0:
            return (
                f"source {name}: all {counts.read:,} documents read are held out of the {split} split by "
                f"data.eval_fraction={self.eval_fraction}; use a smaller data.eval_fraction or more data"
            )
        return (
            f"source {name} has no {split} documents for slot {self.slot} of {self.n_slots} (ranks x dataloader "
            f"workers); use fewer ranks or workers, or more data"
        )

    def doc_counts(self) -> DocCounts:
        """Documents read so far over all epochs (see `quality.DocCounts`)."""
        return self.counts + self._reader.counts if self._reader is not None else self.counts

    def position(self) -> dict[str, Any] | None:
        """The reader's position; before the reader opens, where it was told to start (None = epoch start)."""
        return self._reader.position if self._reader is not None else self._start

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position(),
            "docs_in_epoch": self.docs_in_epoch,
            "fresh_epoch": self.fresh_epoch,
            "counts": self.doc_counts().to_dict(),
            "buffer": self.buffer.state_dict(),
        }

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class Mixture:
    """Weighted, deterministic choice among source cursors for one slot (one cursor: no draws at all)."""

    def __init__(
        self, cursors: list[SourceCursor], weights: list[float], seed: int, slot: int, state: dict | None = None
    ) -> None:
        self.cursors = cursors
        self.weights = weights
        self.seed, self.slot = seed, slot
        self.draws = int((state or {}).get("draws", 0))

    def _pick(self) -> int | None:
        active = [i for i, c in enumerate(self.cursors) if not c.finished]
        if not active:
            return None
        if len(active) == 1:
            return active[0]
        total = sum(self.weights[i] for i in active)
        u = uniform(self.seed, self.slot, self.draws) * total
        self.draws += 1
        for i in active:
            u -= self.weights[i]
            if u < 0:
                return i
        return active[-1]

    def next_doc(self) -> tuple[int, str] | None:
        """(source index, text) of the next document, or None when every source has finished its epochs."""
        while True:
            i = self._pick()
            if i is None:
                return None
            text = self.cursors[i].next_doc()
            if text is not None:
                return i, text

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": [c.state_dict() for c in self.cursors]}

    def cursor(self) -> list[dict[str, Any]]:
        """Per-source (epoch, position): what a resume on a different topology starts from."""
        return [{"epoch": c.epoch, "position": c.position()} for c in self.cursors]

    def close(self) -> None:
        for c in self.cursors:
            c.close()


def _merge_source(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The furthest point of one source over slots: its latest epoch, and in it the furthest position."""
    epoch = max(int(e.get("epoch", 0)) for e in entries)
    current = [e["position"] for e in entries if int(e.get("epoch", 0)) == epoch and e.get("position")]
    if not current:
        return {"epoch": epoch, "position": None}
    if "mine" in current[0]:  # streaming: which files are finished, where the partly read ones stand
        return {"epoch": epoch, "position": merge_stream_positions(current)}
    return {"epoch": epoch, "position": max(current, key=lambda p: int(p.get("index", 0)))}


def merge_cursors(cursors: list[list[dict[str, Any]] | None]) -> list[dict[str, Any]] | None:
    """Per source, the furthest position over slots: every document before it was consumed (or buffered)."""
    cursors = [c for c in cursors if c]
    if not cursors:
        return None
    return [_merge_source([c[i] for c in cursors]) for i in range(len(cursors[0]))]

"""Source mixtures (SPEC D3), epochs and the train/eval split, for one (rank, worker) slot.

`data.sources` syntax: each entry is `LOCATION[:WEIGHT]`, e.g.
    ["fineweb-edu:0.45", "smollm-cosmopedia:0.25", "data/code.jsonl:0.2", "stdlib:0.1"]
The weight is the last `:`-separated part when it parses as a number; weights are relative (they are
normalised to sum to 1) and say what share of *documents* comes from each source. Either every entry
has a weight or none has (then all are equal). A single source needs no weight.

Sampling is deterministic: draw k of slot s picks a source from a counter-based uniform number
u(seed, s, k) (SplitMix64), so the mixture state is one integer, and a resumed run draws the same
sequence. Each source cycles through its epochs on its own (a small source repeats while a large one
is still in its first epoch); each epoch of a local source has its own document (or file) order
from (seed, epoch).

Train/eval split: a document is held out for eval when a hash of its text (BLAKE2b) falls below
`data.eval_fraction`. The hash ignores the seed and position, so eval never shares a document with
train, in any run, on any number of ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tokenmill.data.sources import DocReader, Source
from tokenmill.errors import UserError

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators")."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, stream: int, counter: int) -> float:
    """A reproducible number in [0, 1) for (seed, stream, counter): a stateless RNG whose state is the counter."""
    h = splitmix64(splitmix64(splitmix64(seed & MASK64) ^ (stream & MASK64)) ^ (counter & MASK64))
    return (h >> 11) / float(1 << 53)


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
        raise UserError(f"data.sources: give every source a weight or none ({', '.join(missing)} has none), "
                        f"e.g. [a.jsonl:0.7, b.parquet:0.3]")
    total = sum(w or 1.0 for _, w in parsed)
    return [SourceSpec(loc, (w or 1.0) / total) for loc, w in parsed]


class SourceCursor:
    """One source for one slot and one split: cycles epochs, keeps its position, filters by split."""

    def __init__(self, source: Source, index: int, slot: int, n_slots: int, split: str, eval_fraction: float,
                 seed: int, epochs: int | None, state: dict | None = None, shuffle: bool = True) -> None:
        self.source, self.index = source, index
        self.slot, self.n_slots = slot, n_slots
        self.want_eval = split == "eval"
        self.eval_fraction = eval_fraction
        self.seed = seed if shuffle else None
        self.epochs = epochs
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.docs_in_epoch = int(state.get("docs_in_epoch", 0))
        # True when this epoch is read from its start: only then does "no documents" mean an empty part.
        self.fresh_epoch = bool(state.get("fresh_epoch", state.get("position") is None))
        self.replaced = int(state.get("replaced", 0))
        self.empty = int(state.get("empty", 0))
        self.finished = epochs is not None and self.epoch >= epochs
        self._reader: DocReader | None = None
        self._start = state.get("position")

    def _open(self) -> DocReader:
        # Salt the per-epoch order with the source index so two sources never share an order.
        seed = None if self.seed is None else self.seed * 1000003 + self.index
        reader = self.source.reader(self.epoch, self.slot, self.n_slots, self._start, seed)
        self._start = None
        return reader

    def next_doc(self) -> str | None:
        """The next document of this slot's split, moving to the next epoch as needed; None when finished."""
        while not self.finished:
            if self._reader is None:
                self._reader = self._open()
            for text in self._reader:
                if is_eval_doc(text, self.eval_fraction) == self.want_eval:
                    self.docs_in_epoch += 1
                    return text
            self._end_epoch()
        return None

    def _end_epoch(self) -> None:
        reader, self._reader = self._reader, None
        self.replaced += reader.replaced
        self.empty += reader.empty
        if self.docs_in_epoch == 0 and self.fresh_epoch:
            split = "eval" if self.want_eval else "train"
            raise UserError(f"source {self.source.name} has no {split} documents for slot {self.slot} of "
                            f"{self.n_slots} (ranks x dataloader workers); use fewer ranks or workers, more data"
                            f"{', or a larger data.eval_fraction' if self.want_eval else ''}")
        self.epoch += 1
        self.docs_in_epoch = 0
        self.fresh_epoch = True
        self.finished = self.epochs is not None and self.epoch >= self.epochs

    def state_dict(self) -> dict[str, Any]:
        reader = self._reader
        if reader is not None:
            position = reader.position
        else:
            position = self._start  # not opened yet: wherever we were told to start (None = epoch start)
        return {"epoch": self.epoch, "position": position, "docs_in_epoch": self.docs_in_epoch,
                "fresh_epoch": self.fresh_epoch,
                "replaced": self.replaced + (reader.replaced if reader else 0),
                "empty": self.empty + (reader.empty if reader else 0)}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class Mixture:
    """Weighted, deterministic choice among source cursors for one slot (one cursor: no draws at all)."""

    def __init__(self, cursors: list[SourceCursor], weights: list[float], seed: int, slot: int,
                 state: dict | None = None) -> None:
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
        out = []
        for c in self.cursors:
            s = c.state_dict()
            out.append({"epoch": s["epoch"], "position": s["position"]})
        return out

    def close(self) -> None:
        for c in self.cursors:
            c.close()


def cursor_key(entry: dict[str, Any]) -> tuple[int, int]:
    position = entry.get("position") or {}
    return int(entry.get("epoch", 0)), int(position.get("index", 0))


def merge_cursors(cursors: list[list[dict[str, Any]] | None]) -> list[dict[str, Any]] | None:
    """Per source, the furthest position over slots: every document before it was consumed (or buffered)."""
    cursors = [c for c in cursors if c]
    if not cursors:
        return None
    return [max((c[i] for c in cursors), key=cursor_key) for i in range(len(cursors[0]))]

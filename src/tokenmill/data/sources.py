"""Document sources: `stdlib`, local txt/jsonl/parquet files, `save_to_disk` folders, Hub datasets.

A source turns a location string into documents (str). Every source reads one *epoch* as a fixed,
reproducible sequence of documents with a raw index 0, 1, 2, ...; a `DocReader` reads the part of an
epoch that belongs to one (rank, worker) slot. Its `position` resumes exactly where it stopped without
re-reading the epoch, and its `counts` say how many documents had no text or undecodable bytes.

Two kinds of source:
- indexed (random access, this module): stdlib files, `save_to_disk` folders, and local txt/jsonl/parquet
  files, which `datasets` converts once into an Arrow table in its cache (HF_DATASETS_CACHE; a second run
  reuses it). With shuffling, an epoch is a permutation of all documents drawn from (seed, epoch), so even a
  single sorted file is read in a new order every epoch. A slot reads the raw indices `index % n_slots == slot`.
- streaming (streams.py): Hub datasets, and local files with `data.stream_local_files` (no copy on disk),
  read in stream order through `datasets.load_dataset(..., streaming=True)`. Multi-file sources shuffle their
  file order per epoch and the mixture's cursor adds a document shuffle buffer.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.data.local_files import (
    FILE_KINDS,
    builder_args,
    json_line_error,
    load_error,
    local_files,
    quiet_datasets,
)
from tokenmill.data.quality import DocCounts
from tokenmill.data.shards import is_shard_dir
from tokenmill.errors import UserError


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    text_field: str = "text"


# Named shortcuts for common pretraining corpora (dataset cards on huggingface.co/datasets).
HUB_SHORTCUTS: dict[str, HubDataset] = {
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "fineweb-edu-100b-shuffle": HubDataset("karpathy/fineweb-edu-100b-shuffle", None),
    "fineweb": HubDataset("HuggingFaceFW/fineweb", "sample-10BT"),
    "smollm-cosmopedia": HubDataset("HuggingFaceTB/smollm-corpus", "cosmopedia-v2"),
    "smollm-fineweb-edu": HubDataset("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup"),
    "cosmopedia": HubDataset("HuggingFaceTB/cosmopedia", "web_samples_v2"),
    "finepdfs": HubDataset("HuggingFaceFW/finepdfs", "eng_Latn"),
    "tinystories": HubDataset("roneneldan/TinyStories", None),
}

STDLIB = "stdlib"
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
REPLACEMENT = "\ufffd"


def doc_order(n: int, seed: int | None, epoch: int) -> np.ndarray | None:
    """Per-epoch order of n items: natural (None) or a permutation from (seed, epoch)."""
    if seed is None:
        return None
    return np.random.default_rng([seed, epoch]).permutation(n)


class DocReader(ABC):
    """One slot's part of one epoch of a source: an iterator of texts that knows its resume position."""

    def __init__(self, source_name: str, slot: int, n_slots: int) -> None:
        self.source_name = source_name
        self.slot, self.n_slots = slot, n_slots
        self.counts = DocCounts()

    def __iter__(self) -> DocReader:
        return self

    @abstractmethod
    def __next__(self) -> str:
        """The next document's text of this slot."""

    @property
    @abstractmethod
    def position(self) -> dict[str, Any]:
        """Where this reader stands, enough to reopen it at the next document."""

    def close(self) -> None:  # noqa: B027 - a no-op by design: only readers with open files override it
        """Release open files (readers without any keep the default)."""

    def _scan(self, value: Any) -> None:
        """Count a document pulled from the source, whether or not this slot keeps it."""
        self.counts.scanned += 1
        if isinstance(value, str):
            self.counts.scanned_bytes += len(value.encode("utf-8", "surrogatepass"))

    def _clean(self, text: Any) -> str | None:
        """The text to use, or None for a document to skip; counts both kinds of loss."""
        counts = self.counts
        counts.read += 1
        if not isinstance(text, str):
            counts.null += 1
            return None
        if not text:
            counts.empty += 1
            return None
        if REPLACEMENT in text:
            counts.replaced_docs += 1
            counts.replaced_chars += text.count(REPLACEMENT)
        return text


class Source(ABC):
    """A named document collection; `reader()` opens one slot's part of one epoch."""

    name: str
    streaming: bool = False  # read in stream order (a document shuffle buffer mixes it), not by index

    @abstractmethod
    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        """Open one slot's part of one epoch, at `position` when resuming; `seed` None = natural order."""

    def iter_texts(self, max_chars: int | None = None) -> Iterator[str]:
        """All documents of epoch 0 in natural order (tokenizer training), stopping after `max_chars`."""
        reader = self.reader(0, 0, 1, None, None)
        total = 0
        try:
            for text in reader:
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return
        finally:
            reader.close()


# ---------------------------------------------------------------------------------------------------
# Random-access sources: stdlib files, save_to_disk folders, local files through an Arrow table


class IndexedReader(DocReader):
    def __init__(
        self, source: IndexedSource, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None
    ) -> None:
        super().__init__(source.name, slot, n_slots)
        self.source = source
        self.order = doc_order(len(source), seed, epoch)
        start = int(position["index"]) if position else 0
        self._next_raw = start  # resume position: every raw index below it is done for this slot
        self.index = start + (slot - start) % n_slots  # first raw index >= start that belongs to this slot

    def __next__(self) -> str:
        while self.index < len(self.source):
            raw = self.index
            self.index += self.n_slots
            self._next_raw = raw + 1
            doc = int(self.order[raw]) if self.order is not None else raw
            value = self.source.text(doc)
            self._scan(value)
            text = self._clean(value)
            if text is not None:
                return text
        raise StopIteration

    @property
    def position(self) -> dict[str, Any]:
        return {"index": self._next_raw, "ds": None}


class IndexedSource(Source):
    @abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abstractmethod
    def text(self, i: int) -> Any:
        """Document `i`'s raw text field (anything: the reader skips and counts what is not text)."""

    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        return IndexedReader(self, epoch, slot, n_slots, position, seed)


class StdlibSource(IndexedSource):
    """The running Python's standard library `.py` files, one document per file, sorted by path.

    With `skip_generated`, machine-generated files (data/generated.py's content rule) are left out of the file
    list itself, so document indices, the hash split and resume positions all refer to the kept files only.
    """

    name = STDLIB

    def __init__(self, skip_generated: bool = False) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
            files += [Path(folder) / n for n in names if n.endswith(".py")]
        if not files:
            raise UserError(
                f"no standard-library .py files under {root}: this Python has no stdlib sources; "
                f"use a local data.sources path instead"
            )
        self.files = sorted(files)
        if skip_generated:
            generated = _generated_files(tuple(self.files))
            self.files = [f for f in self.files if f not in generated]
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def text(self, i: int) -> str:
        return _read_py(self.files[i])  # U+FFFD counted by DocReader._clean


def _read_py(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


@functools.lru_cache(maxsize=4)
def _generated_files(files: tuple[Path, ...]) -> frozenset[Path]:
    """The machine-generated files among `files`; cached because a run opens its sources several times."""
    from tokenmill.data.generated import is_generated

    return frozenset(f for f in files if is_generated(_read_py(f)))


class ArrowSource(IndexedSource):
    """A `datasets.Dataset` (memory-mapped Arrow): a `save_to_disk` folder or local files converted once."""

    def __init__(self, name: str, dataset: Any, text_field: str) -> None:
        if len(dataset) == 0:
            raise UserError(f"source {name}: the dataset is empty (no documents)")
        check_field(name, text_field, dataset.column_names, dataset[0].get(text_field))
        self.name = name
        self.column = dataset.select_columns([text_field]).with_format("python")
        self.field = text_field

    def __len__(self) -> int:
        return len(self.column)

    def text(self, i: int) -> Any:
        return self.column[i][self.field]


def check_field(name: str, field: str, columns: list[str], value: Any) -> None:
    """The text field exists and (judged by the first document) holds text; else one line listing the fields."""
    if field not in columns:
        raise UserError(
            f"source {name} has no text field {field!r}; its fields are: {', '.join(columns)} (set data.text_field)"
        )
    if value is not None and not isinstance(value, str):
        raise UserError(
            f"source {name}: field {field!r} holds {type(value).__name__}, not text "
            f"(set data.text_field to a text column; fields: {', '.join(columns)})"
        )


def _disk_source(path: Path, text_field: str) -> ArrowSource:
    """A folder written by `Dataset.save_to_disk` (a DatasetDict uses its 'train' split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"source {path}: cannot read the save_to_disk folder ({str(err).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"source {path}: the saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return ArrowSource(str(path), ds, text_field)


def _indexed_local(path: Path, text_field: str) -> ArrowSource:
    """Local files, converted once by `datasets` into an Arrow table in its cache (reused while unchanged)."""
    import datasets

    kind, files = local_files(path)
    args = builder_args(kind, path, files)
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(**args, data_files=files, split="train")
    except UserError:
        raise
    except Exception as err:
        if json_line_error(str(path), kind, files) is None and "SchemaInferenceError" in repr(err.__context__):
            raise UserError(f"source {path}: the dataset is empty (no documents)") from None  # no rows to infer from
        raise load_error(str(path), kind, files, err) from None
    return ArrowSource(str(path), ds, "text" if kind == "text" else text_field)


def open_source(
    location: str, text_field: str = "text", stream_local: bool = False, skip_generated: bool = False
) -> Source:
    """Resolve a data.sources location: stdlib, a Hub shortcut, a local path, or a Hub repo[@config].

    `stream_local` reads local txt/jsonl/parquet files as a stream instead of converting them to Arrow;
    `skip_generated` leaves machine-generated files out of `stdlib` (data.stdlib_skip_generated).
    """
    from tokenmill.data import streams  # streams.py builds on this module

    if location == STDLIB:
        return StdlibSource(skip_generated)
    if location in HUB_SHORTCUTS:
        hub = HUB_SHORTCUTS[location]
        field = text_field if text_field != "text" else hub.text_field
        return streams.hub_stream(location, hub.repo, hub.config, field)
    path = Path(location).expanduser()
    if is_shard_dir(path):
        raise UserError(
            f"source {location} is a pre-tokenized shards folder: use it as the only data.sources "
            f"entry (shards cannot be mixed with text sources or train a tokenizer)"
        )
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _disk_source(path, text_field)
    if path.exists() or "*" in location:
        return streams.local_stream(path, text_field) if stream_local else _indexed_local(path, text_field)
    repo, _, config = location.partition("@")
    if repo.count("/") == 1 and not location.startswith((".", "/", "~")) and Path(repo).suffix not in FILE_KINDS:
        return streams.hub_stream(location, repo, config or None, text_field)
    raise UserError(
        f"source {location!r}: no such file or folder (and not a Hub dataset 'org/name' or a "
        f"shortcut: {', '.join(sorted(HUB_SHORTCUTS))}, stdlib)"
    )

"""Document sources (SPEC D2): `stdlib`, local txt/jsonl/parquet/`save_to_disk` folders, Hub datasets.

A source turns a location string into documents (str). Every source reads one *epoch* as a fixed,
reproducible sequence of documents with a raw index 0, 1, 2, ...; a `DocReader` reads the part of an
epoch that belongs to one (rank, worker) slot: the documents whose raw index % n_slots == slot (D5).
Its `position` (next raw index, plus the `datasets` iterator state for streaming sources) resumes
exactly where it stopped without re-reading the epoch (user_needs #2/#3).

Local files and Hub datasets all go through the `datasets` library: `load_dataset("json"|"parquet"|
"text", data_files=..., streaming=True)`, `load_from_disk`, `load_dataset(repo, config, streaming=True)`.
How local text files become documents: a single `.txt` file holds one document per non-empty line;
a folder of `.txt` files holds one document per file. Undecodable bytes become U+FFFD and are counted.
"""

from __future__ import annotations

import atexit
import glob
import os
import sysconfig
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.errors import UserError


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    text_field: str = "text"


# Named shortcuts for the pretraining corpora the seeds use (dataset cards on huggingface.co/datasets).
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
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
REPLACEMENT = "\ufffd"

_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _close_open_iterators() -> None:
    # A `datasets` generator left suspended at interpreter exit prints a traceback from a half-torn-down
    # module; closing them first keeps the exit clean.
    for reader in list(_OPEN_ITERATORS):
        reader.close()


def _doc_order(n: int, seed: int | None, epoch: int) -> np.ndarray | None:
    """Per-epoch document order: natural (None) or a permutation from (seed, epoch)."""
    if seed is None:
        return None
    return np.random.default_rng([seed, epoch]).permutation(n)


class DocReader(ABC):
    """One slot's part of one epoch of a source: an iterator of texts that knows its resume position."""

    def __init__(self, source_name: str, slot: int, n_slots: int) -> None:
        self.source_name = source_name
        self.slot, self.n_slots = slot, n_slots
        self.replaced = 0  # U+FFFD characters seen (bytes that were not valid UTF-8)
        self.empty = 0  # documents skipped because their text was empty or missing

    def __iter__(self) -> DocReader:
        return self

    @abstractmethod
    def __next__(self) -> str:
        """The next document's text of this slot."""

    @property
    @abstractmethod
    def position(self) -> dict[str, Any]:
        """Where this reader stands, enough to reopen it at the next document."""

    def close(self) -> None:
        """Release open files (readers without any keep the default)."""

    def _clean(self, text: Any) -> str | None:
        if not isinstance(text, str) or not text:
            self.empty += 1
            return None
        if REPLACEMENT in text:
            self.replaced += text.count(REPLACEMENT)
        return text


class Source(ABC):
    """A named document collection; `reader()` opens one slot's part of one epoch."""

    name: str
    shuffle_files: bool = False

    @abstractmethod
    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        """Open one slot's part of one epoch, at `position` when resuming."""

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
# Random-access sources: stdlib files, save_to_disk folders

class IndexedReader(DocReader):
    def __init__(self, source: IndexedSource, epoch: int, slot: int, n_slots: int, position: dict | None,
                 seed: int | None) -> None:
        super().__init__(source.name, slot, n_slots)
        self.source = source
        self.order = _doc_order(len(source), seed, epoch)
        start = int(position["index"]) if position else 0
        self._next_raw = start  # resume position: every raw index below it is done for this slot
        self.index = start + (slot - start) % n_slots  # first raw index >= start that belongs to this slot

    def __next__(self) -> str:
        while self.index < len(self.source):
            raw = self.index
            self.index += self.n_slots
            self._next_raw = raw + 1
            doc = int(self.order[raw]) if self.order is not None else raw
            text = self._clean(self.source.text(doc, self))
            if text is not None:
                return text
        raise StopIteration

    @property
    def position(self) -> dict[str, Any]:
        return {"index": self._next_raw, "ds": None}


class IndexedSource(Source):
    shuffle_files = True

    @abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abstractmethod
    def text(self, i: int, reader: DocReader) -> Any:
        """Document `i`'s raw text field."""

    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        return IndexedReader(self, epoch, slot, n_slots, position, seed)


class StdlibSource(IndexedSource):
    """The running Python's standard library `.py` files, one document per file, sorted by path."""

    name = STDLIB

    def __init__(self) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
            files += [Path(folder) / n for n in names if n.endswith(".py")]
        if not files:
            raise UserError(f"no standard-library .py files under {root}: this Python has no stdlib sources; "
                            f"use a local data.sources path instead")
        self.files = sorted(files)
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def text(self, i: int, reader: DocReader) -> str:
        data = self.files[i].read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")  # counted by DocReader._clean


class DiskSource(IndexedSource):
    """A folder written by `Dataset.save_to_disk` (a DatasetDict uses its 'train' split)."""

    def __init__(self, path: Path, text_field: str) -> None:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:
            raise UserError(f"source {path}: cannot read the save_to_disk folder ({str(err).splitlines()[0]})") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"source {path}: the saved DatasetDict has no 'train' split "
                                f"(splits: {', '.join(ds)})")
            ds = ds["train"]
        if len(ds) == 0:
            raise UserError(f"source {path}: the dataset is empty")
        _check_field(str(path), text_field, ds.column_names, ds[0].get(text_field))
        self.name = str(path)
        self.column = ds.select_columns([text_field]).with_format("python")
        self.field = text_field

    def __len__(self) -> int:
        return len(self.column)

    def text(self, i: int, reader: DocReader) -> Any:
        return self.column[i][self.field]


# ---------------------------------------------------------------------------------------------------
# Streaming sources: local files and Hub datasets through `datasets.load_dataset(..., streaming=True)`

class StreamReader(DocReader):
    def __init__(self, source: StreamSource, epoch: int, slot: int, n_slots: int, position: dict | None,
                 seed: int | None) -> None:
        super().__init__(source.name, slot, n_slots)
        self.field = source.field
        self.ds = source.dataset(epoch, seed)
        if position and position.get("ds") is not None:
            self.ds.load_state_dict(position["ds"])  # resumes inside the file, no re-reading (datasets >= 2.18)
        self.index = int(position["index"]) if position else 0
        # `.iter(batch_size=1)` rather than `iter(ds)`: inside a DataLoader worker, `iter(ds)` would shard the
        # dataset by worker on its own (and stop workers beyond its file count); we shard by document instead.
        self._it = self.ds.iter(batch_size=1)
        _OPEN_ITERATORS.add(self)

    def __next__(self) -> str:
        while True:
            try:
                example = next(self._it)
            except StopIteration:
                self.close()
                raise
            raw = self.index
            self.index += 1
            if raw % self.n_slots != self.slot:
                continue
            text = self._clean(example[self.field][0])
            if text is not None:
                return text

    @property
    def position(self) -> dict[str, Any]:
        return {"index": self.index, "ds": self.ds.state_dict()}

    def close(self) -> None:
        it, self._it = self._it, iter(())
        if hasattr(it, "close"):
            it.close()
        _OPEN_ITERATORS.discard(self)


class StreamSource(Source):
    """A `datasets.IterableDataset` built per epoch (local multi-file sources reshuffle their file order).

    It keeps only the `load_dataset` arguments (no closures), so it pickles into spawned workers.
    """

    def __init__(self, name: str, args: dict[str, Any], files: list[str] | None, field: str) -> None:
        self.name = name
        self.args = args
        self.files = files
        self.field = field
        self.shuffle_files = files is not None and len(files) > 1
        self._cache: dict[tuple, Any] = {}  # file order -> loaded dataset (a tiny source cycles epochs fast)

    def _build(self, files: list[str] | None) -> Any:
        key = tuple(files or ())
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._load(files)
        return self._cache[key]

    def _load(self, files: list[str] | None) -> Any:
        import datasets

        args = dict(self.args, split="train", streaming=True)
        if files is not None:
            args["data_files"] = files
        try:
            return datasets.load_dataset(**args)
        except UserError:
            raise
        except StopIteration:  # datasets' schema inference found no rows
            raise UserError(f"source {self.name}: the dataset is empty (no documents)") from None
        except Exception as err:
            where = "read it" if files is not None else "open it on the Hugging Face Hub"
            detail = str(err).strip().splitlines()[0] if str(err).strip() else "no details"
            hint = "" if files is not None else "; check the network, or use a local path or data.sources=[stdlib]"
            raise UserError(f"source {self.name}: cannot {where} ({type(err).__name__}: {detail}){hint}") from None

    def dataset(self, epoch: int, seed: int | None) -> Any:
        files = self.files
        if files is not None and seed is not None and len(files) > 1:
            files = [files[i] for i in _doc_order(len(files), seed, epoch)]
        return self._build(files).select_columns([self.field])  # a fresh wrapper: no stale resume state

    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        if not _OPEN_ITERATORS and not getattr(StreamSource, "_atexit", False):
            atexit.register(_close_open_iterators)
            StreamSource._atexit = True
        return StreamReader(self, epoch, slot, n_slots, position, seed)

    def validate(self) -> None:
        """Fail early, in the main process, on an empty dataset or a missing text field."""
        ds = self._build(self.files)
        it = iter(ds)
        try:
            first = next(it)
        except StopIteration:
            raise UserError(f"source {self.name}: the dataset is empty (no documents)") from None
        except UnicodeDecodeError as err:
            raise UserError(f"source {self.name}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8") \
                from None
        finally:
            if hasattr(it, "close"):
                it.close()
        _check_field(self.name, self.field, list(first), first.get(self.field))


def _check_field(name: str, field: str, columns: list[str], value: Any) -> None:
    if field not in columns:
        raise UserError(f"source {name} has no text field {field!r}; its fields are: {', '.join(columns)} "
                        f"(set data.text_field)")
    if value is not None and not isinstance(value, str):
        raise UserError(f"source {name}: field {field!r} holds {type(value).__name__}, not text "
                        f"(set data.text_field to a text column; fields: {', '.join(columns)})")


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) for a file, a glob or a folder of same-kind files."""
    if "*" in str(path):
        files = sorted(glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in FILE_KINDS
                       and not p.name.startswith("."))
    else:
        files = [str(path)]
    kinds = {FILE_KINDS.get(Path(f).suffix) for f in files}
    if not files:
        raise UserError(f"source {path}: no .txt, .jsonl or .parquet files found")
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in FILE_KINDS)
        raise UserError(f"source {bad}: unknown file type; use .txt, .jsonl, .json or .parquet")
    if len(kinds) > 1:
        raise UserError(f"source {path} mixes file types ({', '.join(sorted(kinds))}); list each kind as its "
                        f"own source")
    return kinds.pop(), files


def _local_stream(path: Path, text_field: str) -> StreamSource:
    kind, files = _local_files(path)
    options: dict[str, Any] = {}
    if kind == "text":
        text_field = "text"
        options = {"encoding_errors": "replace",
                   "sample_by": "document" if path.is_dir() or len(files) > 1 else "line"}
    elif kind == "json":
        # datasets only re-decodes when the encoding name differs from "utf-8"; "utf8" (same codec) makes it
        # decode with errors="replace", turning invalid bytes into U+FFFD instead of crashing (see json.py).
        options = {"encoding": "utf8", "encoding_errors": "replace"}

    source = StreamSource(str(path), {"path": kind, **options}, files, text_field)
    source.validate()
    return source


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_stream(name: str, hub: HubDataset, text_field: str | None) -> StreamSource:
    field = text_field or hub.text_field
    label = f"{name} ({hub.repo}{'/' + hub.config if hub.config else ''})" if name != hub.repo else name
    if _hub_offline():
        raise UserError(f"source {label} is on the Hugging Face Hub but this machine is offline "
                        f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); use a local path (txt/jsonl/parquet/"
                        f"save_to_disk folder) or data.sources=[stdlib]")

    source = StreamSource(label, {"path": hub.repo, "name": hub.config}, None, field)
    source.validate()
    return source


def open_source(location: str, text_field: str = "text") -> Source:
    """Resolve a data.sources location: stdlib, a Hub shortcut, a local path, or a Hub repo[@config]."""
    if location == STDLIB:
        return StdlibSource()
    if location in HUB_SHORTCUTS:
        hub = HUB_SHORTCUTS[location]
        return _hub_stream(location, hub, text_field if text_field != "text" else None)
    path = Path(location).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        raise UserError(f"source {location} is a pre-tokenized shards folder: use it as the only data.sources "
                        f"entry (shards cannot be mixed with text sources or train a tokenizer)")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return DiskSource(path, text_field)
    if path.exists() or "*" in location:
        return _local_stream(path, text_field)
    repo, _, config = location.partition("@")
    if repo.count("/") == 1 and not location.startswith((".", "/", "~")) and not Path(repo).suffix in FILE_KINDS:
        return _hub_stream(location, HubDataset(repo, config or None), text_field)
    raise UserError(f"source {location!r}: no such file or folder (and not a Hub dataset 'org/name' or a "
                    f"shortcut: {', '.join(sorted(HUB_SHORTCUTS))}, stdlib)")


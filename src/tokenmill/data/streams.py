"""Streaming sources: Hub datasets and (with `data.stream_local_files`) local files, read file by file.

A streaming source is a list of *files* (local paths, or the `hf://` files of a Hub dataset; a Hub dataset
whose files cannot be listed is one stream). Each epoch visits the files in an order drawn from
(seed, epoch). How the (rank, worker) slots share an epoch:

- file mode, when there are at least as many files as slots: slot s reads the files at positions
  s, s + n_slots, s + 2 n_slots, ... of the epoch order, whole. Every byte is read by one slot only
  (1.0x the data in total), the slots are disjoint and together read every document once.
- document mode, with fewer files than slots: every slot reads every file and keeps the documents whose
  index in the stream % n_slots == slot (n_slots x the bytes; exact and layout-independent).

Each file is its own `datasets.load_dataset(..., streaming=True)` stream, so a reader always knows which
file and how many of its documents it has read. Its position is (file k of the slot's list, documents read
from it, the `datasets` state inside it), which resumes exactly. A resume on another layout starts from a
*plan*: the files of the epoch that no old slot finished, each partly read one continuing from the furthest
state an old slot reached in it (see `merge_stream_positions`), so no document is read twice in that epoch.
"""

from __future__ import annotations

import atexit
import os
import weakref
from pathlib import Path
from typing import Any

from tokenmill.data.local_files import builder_args, load_error, local_files, quiet_datasets
from tokenmill.data.sources import DocReader, Source, check_field, doc_order
from tokenmill.errors import UserError

_OPEN_READERS: weakref.WeakSet = weakref.WeakSet()
CACHED_FILES = 8  # loaded per-file datasets kept per source (a tiny source cycles its epochs quickly)


def _close_open_readers() -> None:
    # A `datasets` generator left suspended at interpreter exit prints a traceback from a half-torn-down
    # module; closing them first keeps the exit clean.
    for reader in list(_OPEN_READERS):
        reader.close()


def assign_files(remaining: list[int], slot: int, n_slots: int) -> tuple[list[int], int, int]:
    """(this slot's files, document stride, document offset): whole files when there are enough of them."""
    if len(remaining) >= n_slots:
        return remaining[slot::n_slots], 1, 0
    return list(remaining), n_slots, slot


class StreamReader(DocReader):
    """One slot's part of one epoch: its files in order, each streamed; documents kept by index % stride."""

    def __init__(self, source: StreamSource, epoch: int, slot: int, n_slots: int, position: dict | None,
                 seed: int | None) -> None:
        super().__init__(source.name, slot, n_slots)
        self.source = source
        self.units = source.epoch_files(epoch, seed)
        position = position or {}
        self.plan = position.get("plan")  # set when this epoch was resumed on another layout
        remaining = self.plan["files"] if self.plan else list(range(len(self.units)))
        self.mine, self.stride, self.offset = assign_files(remaining, slot, n_slots)
        self.index = int(position.get("index", 0))  # raw index of the next document in this slot's stream
        self.k = int(position.get("file", 0))  # which of self.mine is being read
        self.doc = int(position.get("doc", 0))  # documents read from that file
        self._resume_ds = position.get("ds")
        self._ds: Any = None
        self._it: Any = None
        _OPEN_READERS.add(self)

    def _open_file(self) -> None:
        f = self.mine[self.k]
        self._ds = self.source.open_file(self.units[f])
        start = self._resume_ds
        if start is None and self.doc == 0 and self.plan:
            start = self.plan["starts"].get(str(f))  # a file an old slot had partly read
        if start is not None:
            self._ds.load_state_dict(start)  # resumes inside the file (datasets >= 2.18)
        self._resume_ds = None
        # `.iter(batch_size=1)` rather than `iter(ds)`: inside a DataLoader worker, `iter(ds)` would shard the
        # dataset by worker on its own; the slots are assigned here instead.
        self._it = self._ds.iter(batch_size=1)

    def __next__(self) -> str:
        while self.k < len(self.mine):
            if self._it is None:
                self._open_file()
            try:
                example = next(self._it)
            except StopIteration:
                self._it, self._ds = None, None
                self.k, self.doc = self.k + 1, 0
                continue
            except UserError:
                raise
            except Exception as err:
                raise self.source.read_error(self.units[self.mine[self.k]], err) from None
            raw = self.index
            self.index += 1
            self.doc += 1
            value = example[self.source.field][0]
            self._scan(value)
            if raw % self.stride != self.offset:
                continue
            text = self._clean(value)
            if text is not None:
                return text
        self.close()
        raise StopIteration

    @property
    def position(self) -> dict[str, Any]:
        ds = self._ds.state_dict() if self._ds is not None else self._resume_ds
        return {"index": self.index, "file": self.k, "doc": self.doc, "ds": ds, "mine": list(self.mine),
                "n_files": len(self.units), "plan": self.plan}

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()
        _OPEN_READERS.discard(self)


class StreamSource(Source):
    """A list of files (or one unlisted Hub stream) read with `datasets.load_dataset(..., streaming=True)`.

    It keeps only the `load_dataset` arguments (no closures), so it pickles into spawned workers.
    """

    streaming = True

    def __init__(self, name: str, args: dict[str, Any], files: list[str] | None, field: str) -> None:
        self.name = name
        self.args = args
        self.files = files  # None: one stream of a Hub dataset whose files could not be listed
        self.field = field
        self._cache: dict[str | None, Any] = {}

    def epoch_files(self, epoch: int, seed: int | None) -> list[str | None]:
        """The files in this epoch's order (from seed, epoch; natural order without a seed)."""
        if self.files is None:
            return [None]
        order = doc_order(len(self.files), seed, epoch)
        return list(self.files) if order is None else [self.files[i] for i in order]

    def open_file(self, file: str | None) -> Any:
        """A fresh `datasets.IterableDataset` over one file (a fresh wrapper: no stale resume state)."""
        return self._dataset(file).select_columns([self.field])

    def _dataset(self, file: str | None) -> Any:
        if file not in self._cache:
            if len(self._cache) >= CACHED_FILES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[file] = self._load(file)
        return self._cache[file]

    def _load(self, file: str | None) -> Any:
        import datasets

        args = dict(self.args, split="train", streaming=True)
        if file is not None:
            args["data_files"] = [file]
        try:
            with quiet_datasets():
                return datasets.load_dataset(**args)
        except StopIteration:  # datasets' schema inference found no rows
            raise UserError(f"source {self.name}: {file or 'the dataset'} is empty (no documents)") from None
        except Exception as err:
            raise self.read_error(file, err) from None

    def read_error(self, file: str | None, err: BaseException) -> UserError:
        files = None if file is None and self.files is None else [file] if file else self.files
        return load_error(self.name, self.args.get("path"), files, err)

    def reader(self, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None) -> DocReader:
        if not getattr(StreamSource, "_atexit", False):
            atexit.register(_close_open_readers)
            StreamSource._atexit = True
        return StreamReader(self, epoch, slot, n_slots, position, seed)

    def validate(self) -> None:
        """Fail early, in the main process, on an empty dataset, a missing text field or a malformed first line."""
        first_file = None if self.files is None else self.files[0]
        it = iter(self._dataset(first_file))
        try:
            first = next(it)
        except StopIteration:
            raise UserError(f"source {self.name}: the dataset is empty (no documents)") from None
        except Exception as err:
            raise self.read_error(first_file, err) from None
        finally:
            if hasattr(it, "close"):
                it.close()
        check_field(self.name, self.field, list(first), first.get(self.field))


def local_stream(path: Path, text_field: str) -> StreamSource:
    """Local txt/jsonl/parquet files read as a stream (no Arrow copy on disk)."""
    kind, files = local_files(path)
    source = StreamSource(str(path), builder_args(kind, path, files), files, "text" if kind == "text" else text_field)
    source.validate()
    return source


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_files(repo: str, config: str | None) -> tuple[dict[str, Any], list[str] | None]:
    """(load_dataset args, the train split's files) of a Hub dataset; files None when it has no plain file list."""
    import datasets

    with quiet_datasets():
        builder = datasets.load_dataset_builder(repo, config)
    files = (builder.config.data_files or {}).get("train") if builder.config.data_files else None
    module = type(builder).__module__.rsplit(".", 1)[-1]  # packaged builders: parquet, json, text, csv, ...
    if files and module in ("parquet", "json", "text", "csv", "arrow"):
        return {"path": module}, [str(f) for f in files]
    return {"path": repo, "name": config}, None


def hub_stream(label: str, repo: str, config: str | None, field: str) -> StreamSource:
    """A Hub dataset's train split, streamed; its files are listed once so slots can read whole files."""
    name = f"{label} ({repo}{'/' + config if config else ''})" if label != repo and label != f"{repo}@{config}" \
        else label
    if _hub_offline():
        raise UserError(f"source {name} is on the Hugging Face Hub but this machine is offline "
                        f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); use a local path (txt/jsonl/parquet/"
                        f"save_to_disk folder) or data.sources=[stdlib]")
    try:
        args, files = _hub_files(repo, config)
    except UserError:
        raise
    except Exception as err:
        raise load_error(name, None, None, err) from None
    source = StreamSource(name, args, files, field)
    source.validate()
    return source


def merge_stream_positions(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One start position, for a resume on another layout, from the positions of slots in the same epoch.

    A file is finished when a slot moved past it (or an earlier plan left it out); a partly read file
    continues from the furthest state any slot reached in it. Documents of other slots that a document-mode
    reader skipped before that point are not revisited: nothing is read twice, a little may be skipped.
    """
    n_files = int(entries[0]["n_files"])
    plan = entries[0].get("plan")
    done = set(range(n_files)) - set(plan["files"]) if plan else set()
    partial: dict[int, tuple[int, Any]] = {}
    for e in entries:
        mine, k = e["mine"], int(e["file"])
        done |= set(mine[:k])
        if k < len(mine) and int(e["doc"]) > 0:
            f = mine[k]
            if f not in partial or int(e["doc"]) > partial[f][0]:
                partial[f] = (int(e["doc"]), e["ds"])
    starts = {str(f): ds for f, (_, ds) in partial.items() if f not in done}
    files = [f for f in (plan["files"] if plan else range(n_files)) if f not in done]
    return {"index": 0, "file": 0, "doc": 0, "ds": None, "mine": [], "n_files": n_files,
            "plan": {"files": files, "starts": starts}}

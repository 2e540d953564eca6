"""Streaming sources: Hub datasets and (with `data.stream_local_files`) local files, read unit by unit.

A streaming source is a list of *units*: the row groups of its parquet files (read with pyarrow), or its other
files (json, txt: each its own `datasets.load_dataset(..., streaming=True)` stream); a Hub dataset whose files
cannot be listed is one stream. Files are local paths or the `hf://` files of a Hub dataset, opened alike
through fsspec. Each epoch visits the units in an order drawn from (seed, epoch). How the (rank, worker)
slots share an epoch:

- unit mode, when there are at least as many units as slots: slot s reads the units at positions
  s, s + n_slots, s + 2 n_slots, ... of the epoch order, whole. Every byte is read by one slot only
  (1.0x the data in total), the slots are disjoint and together read every document once.
- document mode, with fewer units than slots: every slot reads every unit and keeps the documents whose
  index in the stream % n_slots == slot (n_slots x the bytes; exact and layout-independent).

A reader always knows which unit and how many of its documents it has read. Its position is (unit k of the
slot's list, documents read from it, and for a `datasets` stream its state inside the file), which resumes
exactly. A resume on another layout starts from a *plan*: the units of the epoch that no old slot finished,
each partly read one continuing from the furthest point an old slot reached in it (see
`merge_stream_positions`), so no document is read twice in that epoch.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenmill.data.local_files import builder_args, load_error, local_files, quiet_datasets, silence_json_errors
from tokenmill.data.sources import DocReader, Source, check_field, doc_order
from tokenmill.errors import UserError

_OPEN_READERS: weakref.WeakSet = weakref.WeakSet()
CACHED_FILES = 8  # loaded per-file datasets kept per source (a tiny source cycles its epochs quickly)
Unit = tuple[str | None, int | None]  # (file; None = an unlisted Hub stream, parquet row group or None)


def _close_open_readers() -> None:
    # A `datasets` generator left suspended at interpreter exit prints a traceback from a half-torn-down
    # module; closing them first keeps the exit clean.
    for reader in list(_OPEN_READERS):
        reader.close()


def assign_units(remaining: list[int], slot: int, n_slots: int) -> tuple[list[int], int, int]:
    """(this slot's units, document stride, document offset): whole units when there are enough of them."""
    if len(remaining) >= n_slots:
        return remaining[slot::n_slots], 1, 0
    return list(remaining), n_slots, slot


class StreamReader(DocReader):
    """One slot's part of one epoch: its units in order; documents kept by index % stride."""

    def __init__(
        self, source: StreamSource, epoch: int, slot: int, n_slots: int, position: dict | None, seed: int | None
    ) -> None:
        super().__init__(source.name, slot, n_slots)
        self.source = source
        self.units = source.epoch_units(epoch, seed)
        position = position or {}
        self.plan = position.get("plan")  # set when this epoch was resumed on another layout
        remaining = self.plan["units"] if self.plan else list(range(len(self.units)))
        self.mine, self.stride, self.offset = assign_units(remaining, slot, n_slots)
        self.index = int(position.get("index", 0))  # raw index of the next document in this slot's stream
        self.k = int(position.get("unit", 0))  # which of self.mine is being read
        self.doc = int(position.get("doc", 0))  # documents read from that unit
        self._resume = {"doc": self.doc, "ds": position.get("ds")} if self.doc else None
        self._ds: Any = None  # the open `datasets` stream (None for a parquet row group)
        self._it: Iterator[Any] | None = None
        _OPEN_READERS.add(self)

    def _open_unit(self) -> None:
        u = self.mine[self.k]
        start = self._resume
        if start is None and self.plan:
            start = self.plan["starts"].get(str(u))  # a unit an old slot had partly read
        self._resume = None
        self.doc = int(start["doc"]) if start else 0
        self._ds, self._it = self.source.open_unit(self.units[u], self.doc, start["ds"] if start else None)

    def __next__(self) -> str:
        while self.k < len(self.mine):
            if self._it is None:
                self._open_unit()
            try:
                value = next(self._it)
            except StopIteration:
                self._it, self._ds = None, None
                self.k, self.doc = self.k + 1, 0
                continue
            except UserError:
                raise
            except Exception as err:
                raise self.source.read_error(self.units[self.mine[self.k]][0], err) from None
            raw = self.index
            self.index += 1
            self.doc += 1
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
        if self._it is not None:
            ds = self._ds.state_dict() if self._ds is not None else None
        else:
            ds = self._resume["ds"] if self._resume else None
        return {
            "index": self.index,
            "unit": self.k,
            "doc": self.doc,
            "ds": ds,
            "mine": list(self.mine),
            "n_units": len(self.units),
            "plan": self.plan,
        }

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()
        _OPEN_READERS.discard(self)


def _values(examples: Any, field: str) -> Iterator[Any]:
    """The text values of a `datasets` stream iterated one example at a time (closing it when closed)."""
    try:
        for example in examples:
            yield example[field][0]
    finally:
        if hasattr(examples, "close"):
            examples.close()


class StreamSource(Source):
    """Units of files read in stream order: parquet row groups through pyarrow, other files through `datasets`.

    It keeps only paths, counts and `load_dataset` arguments (no open handles), so it pickles into spawned workers.
    """

    streaming = True

    def __init__(self, name: str, args: dict[str, Any], files: list[str] | None, field: str) -> None:
        self.name = name
        self.args = args
        self.files = files  # None: one stream of a Hub dataset whose files could not be listed
        self.field = field
        self.row_groups: list[int] | None = None  # per parquet file, read from the footers by `validate`
        self._cache: dict[str | None, Any] = {}
        if args.get("path") == "json":
            silence_json_errors()

    def units(self) -> list[Unit]:
        """Every unit in natural order: row groups file by file, or files, or the one unlisted stream."""
        if self.files is None:
            return [(None, None)]
        if self.row_groups is not None:
            return [(f, g) for f, n in zip(self.files, self.row_groups, strict=True) for g in range(n)]
        return [(f, None) for f in self.files]

    def epoch_units(self, epoch: int, seed: int | None) -> list[Unit]:
        """The units in this epoch's order (from seed, epoch; natural order without a seed)."""
        units = self.units()
        order = doc_order(len(units), seed, epoch)
        return units if order is None else [units[i] for i in order]

    def open_unit(self, unit: Unit, doc: int, ds_state: Any) -> tuple[Any, Iterator[Any]]:
        """(the `datasets` stream or None, an iterator of text values) of one unit from document `doc` on."""
        file, group = unit
        if group is not None:  # a parquet row group: a few MB, read whole
            import fsspec
            import pyarrow.parquet as pq

            with fsspec.open(file, "rb") as f:  # a local path or an hf:// URL alike
                values = pq.ParquetFile(f).read_row_group(group, columns=[self.field]).column(0).to_pylist()
            return None, iter(values[doc:])
        if self.args.get("path") == "json":
            silence_json_errors()  # also inside dataloader workers, which may be fresh processes
        ds = self._dataset(file).select_columns([self.field])  # a fresh wrapper: no stale resume state
        if ds_state is not None:
            ds.load_state_dict(ds_state)  # resumes inside the file (datasets >= 2.18)
        # `.iter(batch_size=1)` rather than `iter(ds)`: inside a DataLoader worker, `iter(ds)` would shard the
        # dataset by worker on its own; the slots are assigned here instead.
        return ds, _values(ds.iter(batch_size=1), self.field)

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
        """Fail early, in the main process, on an empty dataset, a missing text field or a malformed first line;
        count the row groups of parquet files (one footer read each)."""
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
        if self.args.get("path") == "parquet" and self.files is not None:
            self.row_groups = [self._count_row_groups(f) for f in self.files]

    def _count_row_groups(self, file: str) -> int:
        import fsspec
        import pyarrow.parquet as pq

        try:
            with fsspec.open(file, "rb") as f:
                return pq.ParquetFile(f).metadata.num_row_groups
        except Exception as err:
            raise self.read_error(file, err) from None


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
    name = (
        f"{label} ({repo}{'/' + config if config else ''})" if label != repo and label != f"{repo}@{config}" else label
    )
    if _hub_offline():
        raise UserError(
            f"source {name} is on the Hugging Face Hub but this machine is offline "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); use a local path (txt/jsonl/parquet/"
            f"save_to_disk folder) or data.sources=[stdlib]"
        )
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

    A unit is finished when a slot moved past it (or an earlier plan left it out); a partly read unit continues
    from the furthest point any slot reached in it. Documents of other slots that a document-mode reader passed
    over before that point are not revisited: nothing is read twice, a little may be skipped.
    """
    n_units = int(entries[0]["n_units"])
    plan = entries[0].get("plan")
    done = set(range(n_units)) - set(plan["units"]) if plan else set()
    partial: dict[int, dict[str, Any]] = {}
    for e in entries:
        mine, k = e["mine"], int(e["unit"])
        done |= set(mine[:k])
        if k < len(mine) and int(e["doc"]) > 0:
            u = mine[k]
            if u not in partial or int(e["doc"]) > partial[u]["doc"]:
                partial[u] = {"doc": int(e["doc"]), "ds": e["ds"]}
    return {
        "index": 0,
        "unit": 0,
        "doc": 0,
        "ds": None,
        "mine": [],
        "n_units": n_units,
        "plan": {
            "units": [u for u in (plan["units"] if plan else range(n_units)) if u not in done],
            "starts": {str(u): start for u, start in partial.items() if u not in done},
        },
    }

"""Local txt/jsonl/parquet files as `datasets` loads them: which files, which builder options, one-line errors.

How local text files become documents: a single `.txt` file holds one document per non-empty line; a folder
(or glob) of `.txt` files holds one document per file. Bytes that are not valid UTF-8 become U+FFFD (counted
by the readers) instead of stopping a run.

`datasets`/pyarrow report a malformed JSON line as a multi-line traceback with a block-relative row; `bad_json_line`
finds the file and line instead, so the error is one line the user can act on.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError

FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
JSON_LOGGER = "datasets.packaged_modules.json.json"  # logs its own copy of a parse error before raising it


def local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) for a file, a glob or a folder of same-kind files."""
    if "*" in str(path):
        files = sorted(glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and p.suffix in FILE_KINDS and not p.name.startswith(".")
        )
    else:
        files = [str(path)]
    kinds = {FILE_KINDS.get(Path(f).suffix) for f in files}
    if not files:
        raise UserError(f"source {path}: no .txt, .jsonl or .parquet files found")
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in FILE_KINDS)
        raise UserError(f"source {bad}: unknown file type; use .txt, .jsonl, .json or .parquet")
    if len(kinds) > 1:
        raise UserError(
            f"source {path} mixes file types ({', '.join(sorted(kinds))}); list each kind as its own source"
        )
    return kinds.pop(), files


def builder_args(kind: str, path: Path, files: list[str]) -> dict[str, Any]:
    """`load_dataset` arguments (without data_files) for one kind of local file."""
    if kind == "text":
        return {
            "path": "text",
            "encoding_errors": "replace",
            "sample_by": "document" if path.is_dir() or len(files) > 1 else "line",
        }
    if kind == "json":
        # datasets only re-decodes when the encoding name differs from "utf-8"; "utf8" (same codec) makes it
        # decode with errors="replace", turning invalid bytes into U+FFFD instead of crashing (see its json.py).
        return {"path": "json", "encoding": "utf8", "encoding_errors": "replace"}
    return {"path": kind}


def bad_json_line(files: list[str]) -> str | None:
    """'file line N: reason' for the first line of `files` that is not one JSON object, or None."""
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{name} line {number}: not valid JSON ({err.msg} at column {err.colno})"
                if not isinstance(value, dict):
                    return f"{name} line {number}: a JSON {type(value).__name__}, not an object"
    return None


def json_line_error(name: str, kind: str | None, files: list[str] | None) -> UserError | None:
    """The error naming the first malformed line of JSON-lines files, or None when every line parses."""
    where = bad_json_line(files) if kind == "json" and files else None
    return None if where is None else UserError(f"source {name}: {where}; fix or delete that line")


def load_error(name: str, kind: str | None, files: list[str] | None, err: BaseException) -> UserError:
    """The one-line error for a failed `datasets` load or read of source `name`."""
    line_error = json_line_error(name, kind, files)
    if line_error is not None:
        return line_error
    cause = err.__cause__ or err
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else "no details"
    if files is None:
        return UserError(
            f"source {name}: cannot open it on the Hugging Face Hub ({type(cause).__name__}: {detail}); "
            f"check the network, or use a local path or data.sources=[stdlib]"
        )
    return UserError(f"source {name}: cannot read it ({type(cause).__name__}: {detail})")


def silence_json_errors() -> None:
    """`datasets` logs its own copy of a JSON parse error while a stream is read; tokenmill reports it in one
    line instead (`load_error`), so that logger only speaks at CRITICAL from the first JSON source on."""
    logging.getLogger(JSON_LOGGER).setLevel(logging.CRITICAL)


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars or logged copies of errors from `datasets` (the caller reports in one line)."""
    import datasets

    logger = logging.getLogger(JSON_LOGGER)
    level, bars = logger.level, not datasets.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()

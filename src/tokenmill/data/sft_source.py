"""Supervised fine-tuning rows (`data.format=prompt_completion`): local jsonl/parquet files, checked row by row.

A row is either
    {"prompt": "...", "completion": "..."}                       (plain text: the completion follows the prompt)
    {"messages": [{"role": "user", "content": "..."}, ...]}       (rendered with the run's chat template)
Other fields are ignored. Every row is checked when the source opens, before anything is trained or written:
a missing field, a wrong type, an empty completion, a conversation without an assistant turn or one the
template cannot render stops the run with one line naming the file, the row and the field. The checked
examples are held in memory (and kept for the next opening of unchanged files, e.g. the eval set at every eval).

Each example becomes one document of an `IndexedSource` (sources.py): its segments, context or learned, as
JSON text. The mixture, shuffling, hash hold-out and exact resume then work on examples exactly as they work on
pretraining documents, and the data-loader workers need no template (it was applied here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenmill.data.chat_template import ChatRenderer, Segment
from tokenmill.data.local_files import local_files
from tokenmill.data.sources import IndexedSource
from tokenmill.errors import UserError

SFT_FILE_KINDS = ("json", "parquet")
PARQUET_BATCH_ROWS = 4096
OPENED_KEEP = 4  # checked sources kept per process: every evaluation reopens the eval set
_opened: dict[tuple, SftSource] = {}


def example_document(segments: list[Segment], templated: bool) -> str:
    """The document text of one example: {"segments": [[text, learned], ...], "templated": bool} as JSON.

    `templated` examples are tokenized with special-token strings as their ids (a template spells out its turn
    markers); prompt/completion text is tokenized as plain text, as `generate` tokenizes a prompt.
    """
    return json.dumps({"segments": [[s.text, s.learned] for s in segments], "templated": templated})


def parse_example(document: str) -> tuple[list[Segment], bool]:
    """The inverse of `example_document`."""
    value = json.loads(document)
    return [Segment(text, bool(learned)) for text, learned in value["segments"]], bool(value["templated"])


class RowError(Exception):
    """What is wrong with one row (the caller adds the file and row number)."""


def row_segments(row: Any, renderer: ChatRenderer | None) -> tuple[list[Segment], bool]:
    """(segments, templated) of one row; RowError says what is wrong with it."""
    if not isinstance(row, dict):
        raise RowError(f"is a JSON {type(row).__name__}, not an object")
    if row.get("messages") is not None:
        return _message_segments(row["messages"], renderer), True
    missing = [f for f in ("prompt", "completion") if row.get(f) is None]
    if missing:
        raise RowError(
            f"missing field {missing[0]!r} (an SFT row holds 'prompt' and 'completion' strings, or 'messages')"
        )
    for field in ("prompt", "completion"):
        if not isinstance(row[field], str):
            raise RowError(f"field {field!r} holds {type(row[field]).__name__}, not a string")
    if not row["completion"]:
        raise RowError("field 'completion' is empty: nothing to learn from this row")
    return [Segment(row["prompt"], False), Segment(row["completion"], True)], False


def _message_segments(messages: Any, renderer: ChatRenderer | None) -> list[Segment]:
    if renderer is None:
        raise RowError("holds 'messages' but data.chat_template=none; set data.chat_template=default or a .jinja file")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    for k, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowError(f"message {k} has no 'role' string")
        if not isinstance(message.get("content"), str):
            raise RowError(f"message {k} has no 'content' string")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not any(m["role"] == "assistant" and m["content"] for m in clean):
        raise RowError("has no assistant message with content: nothing to learn from this row")
    try:
        segments = renderer.segments(clean)
    except ValueError as err:
        raise RowError(str(err)) from None
    if not any(s.learned for s in segments):
        raise RowError(f"the chat template {renderer.origin} renders no assistant text for it")
    return segments


def _jsonl_rows(file: str) -> Iterator[tuple[str, Any]]:
    """('line N', row) of a JSON-lines file (blank lines skipped)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"source {file} line {number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None


def _parquet_rows(file: str) -> Iterator[tuple[str, Any]]:
    """('row N', row) of a parquet file, N counted from 1."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
        number = 0
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
    except OSError as err:
        raise UserError(f"source {file}: cannot read it as parquet ({err})") from None


class SftSource(IndexedSource):
    """The examples of local jsonl/parquet files, validated and held in memory as example documents."""

    def __init__(self, name: str, documents: list[str]) -> None:
        if not documents:
            raise UserError(f"source {name}: no rows (an SFT file holds one JSON object per line)")
        self.name = name
        self.documents = documents

    def __len__(self) -> int:
        return len(self.documents)

    def text(self, i: int) -> str:
        return self.documents[i]

    def iter_texts(self, max_chars: int | None = None) -> Iterator[str]:
        """The examples' plain text (for tools that read text, e.g. tokenizer training)."""
        total = 0
        for document in self.documents:
            text = "".join(s.text for s in parse_example(document)[0])
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


def open_sft_source(location: str, renderer: ChatRenderer | None) -> SftSource:
    """Read and check every row of a local .jsonl/.json/.parquet file, folder or glob (see the module docstring)."""
    path = Path(location).expanduser()
    if not (path.exists() or "*" in location):
        raise UserError(
            f"source {location!r}: no such file or folder; data.format=prompt_completion reads local "
            f".jsonl or .parquet files"
        )
    kind, files = local_files(path)
    if kind not in SFT_FILE_KINDS:
        raise UserError(
            f"source {location}: data.format=prompt_completion reads .jsonl or .parquet files with prompt/completion "
            f"or messages fields, not .txt"
        )
    key = (
        str(location),
        tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files),
        None if renderer is None else (renderer.text, renderer.bos_token, renderer.eos_token),
    )
    if key in _opened:
        return _opened[key]
    read_rows = _jsonl_rows if kind == "json" else _parquet_rows
    documents: list[str] = []
    for file in files:
        for where, row in read_rows(file):
            try:
                segments, templated = row_segments(row, renderer)
            except RowError as err:
                raise UserError(f"source {file} {where}: {err}") from None
            documents.append(example_document(segments, templated))
    source = SftSource(str(location), documents)
    while len(_opened) >= OPENED_KEEP:
        _opened.pop(next(iter(_opened)))
    _opened[key] = source
    return source

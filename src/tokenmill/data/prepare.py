"""`prepare`: tokenize a document stream in parallel into the shard format of `tokenmill.data.shards`.

Pipeline: the main process reads documents and sends batches of them to N worker processes (forked where
the OS can: spawning would re-run `python -m tokenmill` in each child; each worker encodes single-threaded
with `encode_batch`, and the HF tokenizers library turns its thread pool off in forked children); results
come back in order and are cut into chunks of about `shard_tokens` tokens at document ends. The cut
depends only on the document sequence, never on batching or worker count, so the output bytes are the
same for any `workers` and for an interrupted-then-resumed run. Each chunk is written as a train and an
eval shard, then the manifest is rewritten atomically to record it; a rerun skips the documents of the
recorded chunks and continues.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.data import shards as fmt
from tokenmill.data.mixture import is_eval_doc
from tokenmill.data.quality import DocCounts
from tokenmill.errors import UserError

TASK_BYTES = 1 << 20  # text per worker task: big enough to amortise IPC, small enough to keep workers busy
TASK_DOCS = 2048

_TOKENIZER: Any = None  # set in each worker by _init_worker


@dataclass
class PrepareStats:
    """What one `prepare` call did (this run only; totals are in the manifest)."""

    docs: int
    tokens: int
    bytes: int
    seconds: float
    chunks_written: int
    resumed_chunks: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def _init_worker(tokenizer: Any, single_threaded: bool = True) -> None:
    global _TOKENIZER
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N processes already use the cores
    _TOKENIZER = tokenizer


def _encode_task(task: tuple[list[str], float, np.dtype]) -> tuple[np.ndarray, ...]:
    """Encode a batch of documents. Returns, per source document: tokens (all docs, EOS after each),
    lengths (0 for an empty document, which gets no tokens, not even an EOS), is-eval flags, UTF-8 bytes."""
    texts, eval_fraction, dtype = task
    kept = [t for t in texts if t]
    ids = iter(_TOKENIZER.encode_batch(kept) if kept else [])
    per_doc = [next(ids) if t else None for t in texts]
    eos = _TOKENIZER.eos_id
    lengths = np.fromiter((0 if x is None else len(x) + 1 for x in per_doc), dtype=np.int64, count=len(texts))
    tokens = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in per_doc if x is not None),
        dtype=dtype,
        count=int(lengths.sum()),
    )
    is_eval = np.fromiter((is_eval_doc(t, eval_fraction) for t in texts), dtype=bool, count=len(texts))
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts))
    return tokens, lengths, is_eval, nbytes


def _tasks(docs: Iterator[str], eval_fraction: float, dtype: np.dtype) -> Iterator[tuple[list[str], float, np.dtype]]:
    batch: list[str] = []
    size = 0
    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= TASK_BYTES or len(batch) >= TASK_DOCS:
            yield batch, eval_fraction, dtype
            batch, size = [], 0
    if batch:
        yield batch, eval_fraction, dtype


# What prepare writes into its folder: shard files, and the temporary names they are renamed from
# (`shards._atomic_write_bytes`, `write_shard`); nothing else there is ever removed.
SHARD_FILE = re.compile(r"(train|eval)-\d{5}\.(bin|idx\.npy)")
TEMP_FILE = re.compile(r"\.(manifest\.json|(train|eval)-\d{5}\.(bin|idx\.npy))\.tmp\d+")


def _prepare_folder(out: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Decide between fresh start, resume and refusal; return the manifest to continue, or None if done.

    Files are removed only once the folder is accepted, and only files prepare itself writes."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt.is_shard_dir(out):
        old = fmt.read_manifest(out)
        same = old["settings"] == manifest["settings"] and old["tokenizer"]["hash"] == manifest["tokenizer"]["hash"]
        if not same and not overwrite:
            raise UserError(
                f"{out} holds a different prepared dataset (source {old['settings'].get('source')!r}, "
                f"tokenizer {old['tokenizer']['hash']}); choose another --out or pass --overwrite"
            )
        if same and not overwrite:
            _remove(out, TEMP_FILE)  # leftovers of a write interrupted before its rename
            return None if old["complete"] else old
        (out / fmt.MANIFEST).unlink()
    elif not overwrite and any(not TEMP_FILE.fullmatch(p.name) for p in out.iterdir()):
        raise UserError(f"{out} is not empty and is no prepared dataset; choose an empty --out or pass --overwrite")
    _remove(out, TEMP_FILE)
    _remove(out, SHARD_FILE)  # shards of an earlier dataset or an unrecorded chunk are rewritten anyway
    return manifest


def _remove(folder: Path, pattern: re.Pattern) -> None:
    for path in folder.iterdir():
        if path.is_file() and pattern.fullmatch(path.name):
            path.unlink()


def _write_chunk(
    out: Path,
    manifest: dict[str, Any],
    index: int,
    tokens: np.ndarray,
    lengths: np.ndarray,
    is_eval: np.ndarray,
    docs_end: int,
    bytes_end: int,
) -> None:
    token_is_eval = np.repeat(is_eval, lengths)
    for split, doc_mask, tok_mask in (("train", ~is_eval, ~token_is_eval), ("eval", is_eval, token_is_eval)):
        split_lengths = lengths[doc_mask & (lengths > 0)]
        if split_lengths.size == 0:
            continue
        starts = np.concatenate([[0], np.cumsum(split_lengths)[:-1]])
        entry = fmt.write_shard(out, f"{split}-{index:05d}", tokens[tok_mask], starts)
        info = manifest["splits"][split]
        info["shards"].append(entry)
        info["tokens"] += entry["tokens"]
        info["docs"] += entry["docs"]
    manifest["chunks"].append({"docs_end": docs_end, "bytes_end": bytes_end})
    manifest["source_docs"], manifest["source_bytes"] = docs_end, bytes_end
    fmt.write_manifest(out, manifest)


def prepare_documents(
    docs: Iterable[str],
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    tokenizer_spec: str,
    source: str,
    text_field: str = "text",
    eval_fraction: float = 0.0,
    shard_tokens: int = 1 << 27,
    workers: int = 1,
    overwrite: bool = False,
    progress: Any = None,
    doc_counts: DocCounts | None = None,
) -> PrepareStats:
    """Tokenize `docs` into `out` (see module doc). `progress(docs, bytes, tokens)` is called as work lands.

    `doc_counts` is the reader's live count of documents that lost text (the whole source, as a resumed run
    reads past the finished chunks too); it is recorded in the manifest when the dataset is complete.
    """
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens={shard_tokens} must be > 0")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction={eval_fraction} must be in [0, 1)")
    out = Path(out)
    settings = {
        "source": source,
        "text_field": text_field,
        "eval_fraction": eval_fraction,
        "shard_tokens": shard_tokens,
    }
    manifest = _prepare_folder(out, fmt.new_manifest(tokenizer, tokenizer_spec, settings), overwrite)
    if manifest is None:
        return PrepareStats(0, 0, 0, 0.0, 0, -1)  # already complete with these settings
    fmt.write_manifest(out, manifest)  # from now on the folder is this (unfinished) dataset: a rerun resumes it
    dtype = fmt.token_dtype(tokenizer.vocab_size)
    resumed = len(manifest["chunks"])
    docs_done, bytes_done = manifest["source_docs"], manifest["source_bytes"]
    doc_iter = itertools.islice(iter(docs), docs_done, None)
    start, run_docs, run_tokens, run_bytes = time.perf_counter(), 0, 0, 0
    pending: list[tuple[np.ndarray, ...]] = []  # encoded documents not yet in a chunk
    pending_tokens = 0

    pool = None
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
        results = pool.imap(_encode_task, _tasks(doc_iter, eval_fraction, dtype))
    else:
        _init_worker(tokenizer, single_threaded=False)  # in this process: leave the environment alone
        results = map(_encode_task, _tasks(doc_iter, eval_fraction, dtype))
    try:
        for result in itertools.chain(results, [None]):
            final = result is None
            if not final:
                pending.append(result)
                pending_tokens += result[0].size
                run_docs += result[1].size
                run_bytes += int(result[3].sum())
            # cut as many full chunks as the pending documents hold (or everything at the end)
            while pending and (final or pending_tokens >= shard_tokens):  # concatenate only when a chunk is due
                tok, lens, flags, nbytes = (np.concatenate(col) for col in zip(*pending, strict=True))
                cums = np.cumsum(lens)
                cut = int(np.searchsorted(cums, shard_tokens, side="left"))  # first doc reaching shard_tokens
                if cut >= lens.size and not final:
                    pending = [(tok, lens, flags, nbytes)]
                    break
                cut = min(cut, lens.size - 1) + 1  # documents in this chunk
                ntok = int(cums[cut - 1])
                docs_done += cut
                bytes_done += int(nbytes[:cut].sum())
                _write_chunk(
                    out, manifest, len(manifest["chunks"]), tok[:ntok], lens[:cut], flags[:cut], docs_done, bytes_done
                )
                pending = [(tok[ntok:], lens[cut:], flags[cut:], nbytes[cut:])] if cut < lens.size else []
                pending_tokens -= ntok
                run_tokens += ntok
            if progress is not None and not final:
                progress(run_docs, run_bytes, run_tokens)
    finally:
        if pool is not None:
            pool.terminate()
    if manifest["splits"]["train"]["docs"] + manifest["splits"]["eval"]["docs"] == 0:
        (out / fmt.MANIFEST).unlink(missing_ok=True)
        raise UserError(f"source {source!r} produced no non-empty documents (check the path and --text-field)")
    manifest["complete"] = True
    if doc_counts is not None:
        manifest["documents"] = doc_counts.to_dict()
    fmt.write_manifest(out, manifest)
    return PrepareStats(
        run_docs, run_tokens, run_bytes, time.perf_counter() - start, len(manifest["chunks"]) - resumed, resumed
    )

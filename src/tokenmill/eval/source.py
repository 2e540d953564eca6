"""Loss, perplexity and bits per byte of a model over a whole data source, the same number every time.

The source becomes one token stream laid out as in training (data/packing.py): every document followed by EOS,
and one EOS in front of the first document, so every document is predicted from the separator the model saw
before documents in training, its first token included. A pre-tokenized shard folder gives one such stream per
shard file (its tokens already hold the EOS separators).

Windows over a stream of N tokens score each of the N - 1 predictions exactly once. Window k feeds tokens
[k*S, k*S + L) and predicts the next token at each position (L = seq_len, S = stride); it scores only the
predictions no earlier window scored. With S = L (the default) the windows do not overlap and each prediction
sees the context since its window began; with S < L every prediction after the first window sees at least
L - S tokens of context (the sliding-window evaluation of the Hugging Face perplexity guide,
https://huggingface.co/docs/transformers/perplexity).

Bits per byte = total nats / ln 2 / UTF-8 bytes of the documents' text (EOS separators count no bytes; for
shards, the tokenizer's text bytes per id summed), which compares models with different tokenizers (Gao et al.
2020, The Pile, section 4.2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.errors import UserError

SPLITS = ("all", "train", "eval")  # for shard folders: which prepared split(s) to score
CHUNK_TOKENS = 1 << 20  # tokens of a shard read at a time


@dataclass
class Stream:
    """The token chunks of one stream and a callback telling how many text bytes the chunks hold so far."""

    chunks: Iterable[np.ndarray]
    bytes_so_far: Callable[[], int]
    documents_so_far: Callable[[], int]


def windows(chunks: Iterable[np.ndarray], length: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
    """(window of at most length + 1 tokens, how many of its last predictions to score) over a token stream
    given in chunks; only the tokens of the current window are kept in memory."""
    if not 1 <= stride <= length:
        raise UserError(f"--stride {stride} must be between 1 and the window length {length}")
    source = iter(chunks)
    buffer, offset = np.zeros(0, dtype=np.int64), 0  # buffer[0] is stream token `offset`
    begin, scored, ended = 0, 0, False  # predictions of tokens 1..scored are done
    while True:
        while not ended and offset + len(buffer) < begin + length + 1:
            chunk = next(source, None)
            if chunk is None:
                ended = True
            else:
                buffer = np.concatenate([buffer, np.asarray(chunk, dtype=np.int64)])
        end = min(begin + length, offset + len(buffer) - 1)  # last predicted token of this window
        if end <= scored:
            return
        yield buffer[begin - offset : end + 1 - offset], end - scored
        scored, begin = end, begin + stride
        drop = min(begin - offset, len(buffer))  # tokens before the next window (never past the stream's end)
        buffer, offset = buffer[drop:], offset + drop


def text_stream(location: str, tokenizer: Any, text_field: str = "text") -> Stream:
    """Documents of a text source (anything `data.sources` accepts) as EOS-separated tokens."""
    from tokenmill.data.sources import open_source

    source = open_source(location, text_field)
    counts = {"bytes": 0, "documents": 0}

    def chunks() -> Iterator[np.ndarray]:
        yield np.array([tokenizer.eos_id], dtype=np.int64)
        batch: list[str] = []
        for text in source.iter_texts():
            batch.append(text)
            if len(batch) == 64:
                yield from encode(batch)
                batch = []
        yield from encode(batch)

    def encode(texts: list[str]) -> Iterator[np.ndarray]:
        for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
            counts["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            counts["documents"] += 1
            yield np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)

    return Stream(chunks(), lambda: counts["bytes"], lambda: counts["documents"])


def shard_streams(location: str, tokenizer: Any, split: str) -> Iterator[Stream]:
    """One stream per shard file of a prepared folder (windows never cross shard files, as in training)."""
    from tokenmill.data.shards import open_shards, read_manifest

    manifest = read_manifest(location)
    splits = [s for s in ("train", "eval") if s == split or (split == "all" and manifest["splits"][s]["shards"])]
    token_bytes = np.asarray(tokenizer.token_bytes(), dtype=np.int64)  # text bytes per id, 0 for special tokens
    for name in splits:
        shard_set = open_shards(location, name, tokenizer)  # refuses shards made with another tokenizer
        for shard in shard_set.shards:
            tokens = np.memmap(shard.path, dtype=shard_set.dtype, mode="r")
            yield shard_stream(tokens, tokenizer.eos_id, token_bytes)


def shard_stream(tokens: np.ndarray, eos_id: int, token_bytes: np.ndarray) -> Stream:
    """A shard's tokens (EOS after every document) behind one leading EOS, read CHUNK_TOKENS at a time."""
    counts = {"bytes": 0, "documents": 0}

    def chunks() -> Iterator[np.ndarray]:
        yield np.array([eos_id], dtype=np.int64)
        for start in range(0, len(tokens), CHUNK_TOKENS):
            piece = np.asarray(tokens[start : start + CHUNK_TOKENS], dtype=np.int64)
            counts["bytes"] += int(token_bytes[piece].sum())
            counts["documents"] += int((piece == eos_id).sum())
            yield piece

    return Stream(chunks(), lambda: counts["bytes"], lambda: counts["documents"])


def streams_of(location: str, tokenizer: Any, text_field: str = "text", split: str = "all") -> Iterator[Stream]:
    from tokenmill.data.shards import is_shard_dir

    if split not in SPLITS:
        raise UserError(f"--split {split} is not one of {', '.join(SPLITS)}")
    if is_shard_dir(location):
        yield from shard_streams(location, tokenizer, split)
    else:
        yield text_stream(location, tokenizer, text_field)


def score_source(
    model: torch.nn.Module,
    tokenizer: Any,
    location: str,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    split: str = "all",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float | int]:
    """Loss (nats per token), perplexity and bits per byte of `model` over every document of `location`.

    `seq_len` defaults to the model's context; `stride` to seq_len (non-overlapping windows). `progress` is
    called with the number of tokens scored after each batch.
    """
    from tokenmill.eval.scoring import target_logprobs

    length = int(seq_len or model.cfg.max_seq_len)
    if not 1 <= length <= model.cfg.max_seq_len:
        raise UserError(f"--seq-len {length} must be between 1 and the model's context ({model.cfg.max_seq_len})")
    stride = int(stride or length)
    device = next(model.parameters()).device
    nats, tokens, text_bytes, documents, n_windows = 0.0, 0, 0, 0, 0

    def flush(batch: list[tuple[np.ndarray, int]]) -> None:
        nonlocal nats, tokens, n_windows
        inputs = torch.from_numpy(np.stack([w[:-1] for w, _ in batch])).to(device)  # (B, T)
        width = inputs.shape[1]
        rows = [r for r, (_, n) in enumerate(batch) for _ in range(n)]
        positions = [p for _, n in batch for p in range(width - n, width)]
        targets = [int(t) for w, n in batch for t in w[len(w) - n :]]
        with autocast():
            logp, _ = target_logprobs(model, inputs, rows, positions, targets)
        nats -= float(logp.sum())
        tokens += len(targets)
        n_windows += len(batch)
        if progress is not None:
            progress(len(targets))

    for stream in streams_of(location, tokenizer, text_field, split):
        batch: list[tuple[np.ndarray, int]] = []
        for window, n in windows(stream.chunks, length, stride):
            if batch and (len(batch) == batch_size or len(window) != len(batch[0][0])):
                flush(batch)
                batch = []
            batch.append((window, n))
        if batch:
            flush(batch)
        text_bytes += stream.bytes_so_far()
        documents += stream.documents_so_far()
    if tokens == 0:
        raise UserError(f"source {location} holds no text to evaluate")
    loss = nats / tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / math.log(2) / max(text_bytes, 1),
        "tokens": tokens,
        "bytes": text_bytes,
        "documents": documents,
        "windows": n_windows,
        "seq_len": length,
        "stride": stride,
    }


def describe_source(location: str) -> str:
    """A short file-name-safe label of a source, for result file names."""
    label = Path(location).name or location
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60] or "source"

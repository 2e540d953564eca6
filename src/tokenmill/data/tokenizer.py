"""Tokenizers: one `Tokenizer` wrapper over a byte tokenizer or any Hugging Face `tokenizer.json`.

Why one wrapper: the packer, the shard writer, generation and export all need the same five things
(`encode_batch`, `decode`, `vocab_size`, `eos_id`, `bos_id`) plus a content `hash` that is written into
every artefact built with the tokenizer, so a shard folder or checkpoint made with another tokenizer is
refused instead of silently producing garbage.

EOS/BOS are explicit: `encode_batch` never adds special tokens, and text that happens to contain the
string "<|eos|>" is encoded as ordinary text (`encode_special_tokens`), so the only EOS ids in a packed
stream are the ones the packer put there. That is what makes document boundaries (doc_ids) exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError

EOS, BOS, PAD = "<|eos|>", "<|bos|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, BOS, PAD)

# End/begin-of-document tokens of common tokenizer.json files, tried in order when loading one
# (GPT-2 <|endoftext|>, Llama 3 <|end_of_text|>/<|begin_of_text|>, Mistral/Llama 2 </s>/<s>, Gemma <eos>/<bos>).
EOS_CANDIDATES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
BOS_CANDIDATES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")

# Pre-tokenization split of GPT-4's cl100k_base (tiktoken, openai_public.py): letters, 1-3 digit numbers,
# punctuation runs and whitespace runs become separate pieces before byte-level BPE merges them.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
BYTE_VOCAB = 256


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Tokenizer:
    """A byte tokenizer or a Hugging Face `tokenizers.Tokenizer`, with explicit special-token ids.

    Build with `Tokenizer.byte()`, `Tokenizer.from_file(path)`, `load_tokenizer(name)` or `train_bpe(...)`.
    """

    def __init__(
        self,
        backend: Any | None,
        name: str,
        eos_id: int,
        bos_id: int,
        pad_id: int | None,
        vocab_size: int,
        content_hash: str,
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer, or None for the byte tokenizer
        self.name = name
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.hash = content_hash

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def byte(cls) -> Tokenizer:
        """UTF-8 bytes 0..255 plus <|eos|>=256, <|bos|>=257, <|pad|>=258: needs no files, never unknown."""
        return cls(
            None,
            "byte",
            BYTE_VOCAB,
            BYTE_VOCAB + 1,
            BYTE_VOCAB + 2,
            BYTE_VOCAB + len(SPECIAL_TOKENS),
            _short_hash("tokenmill-byte-v1"),
        )

    @classmethod
    def from_backend(cls, backend: Any, name: str) -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer`, finding its end/begin-of-document tokens."""
        backend.encode_special_tokens = True  # "<|eos|>" inside a document is text, not a boundary
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise UserError(
                f"tokenizer {name} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
                f"add one as a special token or train one with `tokenmill tokenizer train`"
            )
        bos = next((vocab[t] for t in BOS_CANDIDATES if t in vocab), eos)
        pad = vocab.get(PAD)
        # Canonical JSON (sorted keys, no whitespace) so formatting of the file does not change the hash.
        canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, separators=(",", ":"))
        size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        return cls(backend, name, eos, bos, pad, size, _short_hash(canonical))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` (or a folder holding one)."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise UserError(f"tokenizer file {p} does not exist: give a tokenizer.json path, 'byte' or 'bpe'")
        try:
            backend = HFTokenizer.from_file(str(p))
        except Exception as err:  # the Rust error says which field is wrong
            raise UserError(f"{p} is not a valid tokenizer.json: {str(err).splitlines()[0]}") from None
        return cls.from_backend(backend, str(p))

    # -- use ------------------------------------------------------------------------------------------
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without any special tokens (the packer adds EOS/BOS)."""
        if self.backend is None:
            return [list(t.encode("utf-8", "surrogatepass")) for t in texts]
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are shown as their names, invalid UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        out, run = [], bytearray()
        for i in ids:
            if i < BYTE_VOCAB:
                run.append(i)
                continue
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
            out.append(SPECIAL_TOKENS[i - BYTE_VOCAB] if i - BYTE_VOCAB < len(SPECIAL_TOKENS) else f"<|{i}|>")
        out.append(run.decode("utf-8", "replace"))
        return "".join(out)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of text each id stands for (0 for special tokens): the denominator of bits per byte.

        Summing it over a window's targets counts the bytes of the text the model predicted, exactly, whatever
        the tokenizer; decoding windows instead miscounts split multi-byte characters and special tokens.
        """
        if self.backend is None:
            return [1] * BYTE_VOCAB + [0] * (self.vocab_size - BYTE_VOCAB)
        out = [0] * self.vocab_size
        added = self.backend.get_added_tokens_decoder()  # id -> AddedToken, whose content is plain text
        byte_level = '"ByteLevel"' in self.backend.to_str()
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or (i in added and added[i].special):
                continue
            if byte_level and i not in added:
                out[i] = len(token)  # byte-level BPE writes each byte as one character (GPT-2's bytes_to_unicode)
            elif BYTE_FALLBACK.fullmatch(token):
                out[i] = 1  # SentencePiece byte-fallback token <0xNN>
            else:  # Metaspace tokenizers write a space as U+2581
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into `out_dir` atomically (the byte tokenizer has no file to write)."""
        if self.backend is None:
            raise UserError("the byte tokenizer needs no file: use data.tokenizer=byte")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".tokenizer.json.{os.getpid()}.tmp"
        self.backend.save(str(tmp))
        os.replace(tmp, out / "tokenizer.json")
        return out / "tokenizer.json"

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_id}, hash={self.hash})"


# ---------------------------------------------------------------------------------------------------
# Training and loading


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-4 split pattern, specials <|eos|> <|bos|> <|pad|> = ids 0, 1, 2).

    `texts` is any iterator of documents; `length` (documents, if known) sizes the progress bar.
    Written to `out_dir/tokenizer.json` when `out_dir` is given.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    min_vocab = BYTE_VOCAB + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise UserError(f"vocab size {vocab_size} is too small for a byte-level BPE: use at least {min_vocab}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    backend.train_from_iterator(counted(), trainer=trainer, length=length)
    if seen == 0:
        raise UserError("no documents to train the tokenizer on: the source is empty")
    tok = Tokenizer.from_backend(backend, f"bpe-{vocab_size}")
    if out_dir is not None:
        tok.save(out_dir)
        tok.name = str(Path(out_dir) / "tokenizer.json")
    return tok


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def load_from_hub(repo_id: str) -> Tokenizer:
    """Download (or reuse from the HF cache) `tokenizer.json` of a Hub model repo."""
    from huggingface_hub import hf_hub_download

    how = "download it once while online, or pass a local tokenizer.json path (or use data.tokenizer=byte/bpe)"
    try:
        path = hf_hub_download(repo_id, "tokenizer.json", local_files_only=_hub_offline())
    except Exception as err:
        reason = (
            "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
            if _hub_offline()
            else f"could not fetch it from the Hugging Face Hub ({type(err).__name__})"
        )
        raise UserError(f"tokenizer {repo_id!r}: {reason}; {how}") from None
    tok = Tokenizer.from_file(path)
    tok.name = repo_id
    return tok


def load_tokenizer(name: str) -> Tokenizer:
    """'byte', a tokenizer.json path or folder, or a Hub repo id like 'mistralai/Mistral-7B-v0.1'."""
    if name == "byte":
        return Tokenizer.byte()
    if Path(name).exists():
        return Tokenizer.from_file(name)
    if HUB_NAME.match(name) and not name.endswith(".json"):
        return load_from_hub(name)
    raise UserError(f"tokenizer {name!r} is not 'byte', 'bpe', an existing tokenizer.json path or a Hub repo id")


def build_tokenizer(data_cfg: Any, cache_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`; 'bpe' trains on the first source once and caches it.

    The cache key covers the source, text field, vocab size and training budget, so changing any of them
    trains a new tokenizer instead of reusing a stale one. Training is deterministic, so ranks that race
    to fill the cache write identical files (the write is atomic).
    """
    if data_cfg.tokenizer != "bpe":
        return load_tokenizer(data_cfg.tokenizer)
    from tokenmill.data.mixture import parse_sources
    from tokenmill.data.shards import is_shard_dir, read_manifest
    from tokenmill.data.sources import open_source

    spec = parse_sources(data_cfg.sources)[0]
    if is_shard_dir(spec.location):  # pre-tokenized shards: use the tokenizer that wrote them
        shards = Path(spec.location).expanduser()
        return load_tokenizer(
            str(shards) if (shards / "tokenizer.json").is_file() else read_manifest(shards)["tokenizer"]["spec"]
        )
    chars = getattr(data_cfg, "tokenizer_train_chars", 0)
    skip_generated = getattr(data_cfg, "stdlib_skip_generated", False)
    key_parts = [spec.location, data_cfg.text_field, data_cfg.tokenizer_vocab_size, chars]
    key = _short_hash(json.dumps(key_parts + ["skip_generated"] if skip_generated else key_parts))
    folder = Path(cache_dir) / f"tokenizer-bpe{data_cfg.tokenizer_vocab_size}-{key}"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(folder)
    # the loader reads the same source the same way, so a local file is converted to Arrow once for both
    source = open_source(
        spec.location, data_cfg.text_field, getattr(data_cfg, "stream_local_files", False), skip_generated
    )
    texts = source.iter_texts(max_chars=chars or None)
    return train_bpe(texts, data_cfg.tokenizer_vocab_size, folder, progress=True)


def check_vocab(model_vocab: int, tokenizer: Tokenizer) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    if model_vocab < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids, {tokenizer.name}): set model.vocab_size >= "
            f"{tokenizer.vocab_size}, or 0 to take it from the tokenizer"
        )

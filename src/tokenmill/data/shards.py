"""Pre-tokenized shard format: writing shards atomically, reading and verifying them.

A prepared dataset is a folder:

    manifest.json            format version, tokenizer (hash, vocab, eos), dtype, settings, shard list
    train-00000.bin          raw tokens (uint16 when vocab < 65536, else uint32), EOS after every document
    train-00000.idx.npy      int64 start offset of every document inside that shard
    eval-00000.bin ...       the held-out documents of the same stretch of the source

`prepare` cuts the source into *chunks* of about `shard_tokens` tokens; each chunk yields one train and one
eval shard (either may be absent when empty), and the manifest records how many source documents each chunk
consumed, so an interrupted `prepare` resumes after the last completed chunk and produces the same files.
Every file is written to a temporary name and renamed, and the manifest is rewritten (atomically) after every
chunk: a crash leaves either the old or the new manifest, never a torn one.

Verification (`verify=`): "size" (default, cheap) checks every file's byte size against the manifest, which
catches truncation; "full" also recomputes each file's sha256 (reads everything once); "none" skips both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.errors import UserError

FORMAT = "tokenmill-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
VERIFY_MODES = ("none", "size", "full")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 (half the bytes of uint32) when every id fits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def is_shard_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a shard manifest: the one test loader, sources and tokenizer use.

    Only the file's presence counts; `read_manifest` then checks its content, so a damaged manifest gives a
    one-line error about the manifest instead of being read as a text source.
    """
    return (Path(path).expanduser() / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------------
# Writing


def _atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomic manifest write (temp + fsync + rename, then fsync the folder so the rename is durable)."""
    _atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(folder: Path, name: str, tokens: np.ndarray, doc_starts: np.ndarray) -> dict[str, Any]:
    """Write one shard (`name`.bin + `name`.idx.npy) atomically and return its manifest entry."""
    bin_path, idx_path = folder / f"{name}.bin", folder / f"{name}.idx.npy"
    _atomic_write_bytes(bin_path, memoryview(np.ascontiguousarray(tokens)).cast("B"))
    tmp = idx_path.with_name(f".{idx_path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, doc_starts.astype(np.int64, copy=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, idx_path)
    return {
        "file": bin_path.name,
        "index": idx_path.name,
        "tokens": int(tokens.size),
        "docs": int(doc_starts.size),
        "sha256": sha256_file(bin_path),
        "index_sha256": sha256_file(idx_path),
        "index_bytes": idx_path.stat().st_size,
    }


def new_manifest(tokenizer: Any, tokenizer_spec: str, settings: dict[str, Any]) -> dict[str, Any]:
    """An empty, incomplete manifest; `settings` are the prepare arguments that decide the output bytes."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "tokenizer": {
            "hash": tokenizer.hash,
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id),
            "spec": tokenizer_spec,
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "settings": settings,
        "chunks": [],  # one entry per completed chunk: {"docs_end": source docs consumed so far}
        "splits": {split: {"tokens": 0, "docs": 0, "shards": []} for split in SPLITS},
        "source_docs": 0,
        "source_bytes": 0,
    }


# ---------------------------------------------------------------------------------------------------
# Reading


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a manifest; every problem is a one-line UserError saying how to fix it."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"shard folder not found: {folder} (create it with `tokenmill prepare SOURCE --out {folder}`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} holds no {MANIFEST}: not a prepared dataset "
            f"(create it with `tokenmill prepare SOURCE --out {folder}`)"
        )
    fix = f"re-run `tokenmill prepare ... --out {folder} --overwrite`"
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}); {fix}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} holds a JSON {type(manifest).__name__}, not a shard manifest (an object); {fix}")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path} is format {manifest.get('format')} v{manifest.get('version')}, this tokenmill reads "
            f"{FORMAT} v{FORMAT_VERSION}; {fix}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{path} is not a valid shard manifest: {problem}; {fix}")
    return manifest


# key -> type of every manifest value the readers use; a shard entry's file names must be plain names in the folder
_MANIFEST_KEYS = {
    "complete": bool,
    "tokenizer": dict,
    "dtype": str,
    "settings": dict,
    "chunks": list,
    "splits": dict,
    "source_docs": int,
    "source_bytes": int,
}
_TOKENIZER_KEYS = {"hash": str, "vocab_size": int, "eos_id": int, "spec": str}
_SPLIT_KEYS = {"tokens": int, "docs": int, "shards": list}
_SHARD_KEYS = {
    "file": str,
    "index": str,
    "tokens": int,
    "docs": int,
    "sha256": str,
    "index_sha256": str,
    "index_bytes": int,
}


def _missing(obj: dict[str, Any], keys: dict[str, type], where: str) -> str | None:
    for key, kind in keys.items():
        if key not in obj:
            return f"{where}{key!r} is missing"
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            return f"{where}{key!r} is {type(obj[key]).__name__}, expected {kind.__name__}"
    return None


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a parsed manifest's structure, or None (checked once, so readers can index freely)."""
    problem = _missing(manifest, _MANIFEST_KEYS, "") or _missing(manifest["tokenizer"], _TOKENIZER_KEYS, "tokenizer.")
    if problem:
        return problem
    if manifest["dtype"] not in ("uint16", "uint32"):
        return f"dtype {manifest['dtype']!r} is not uint16 or uint32"
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if not isinstance(info, dict):
            return f"splits.{split} is missing"
        problem = _missing(info, _SPLIT_KEYS, f"splits.{split}.")
        for i, entry in enumerate(info["shards"] if problem is None else []):
            where = f"splits.{split}.shards[{i}]"
            problem = (
                f"{where} is not an object"
                if not isinstance(entry, dict)
                else _missing(entry, _SHARD_KEYS, f"{where}.")
            )
            if problem is None and any(Path(entry[k]).name != entry[k] for k in ("file", "index")):
                problem = f"{where} names a file outside the folder ({entry['file']!r}, {entry['index']!r})"
            if problem:
                break
        if problem:
            return problem
    return None


@dataclass
class Shard:
    """One shard file of a split: its token count and the paths of its tokens and document index."""

    path: Path
    index_path: Path
    tokens: int
    docs: int


@dataclass
class ShardSet:
    """The verified shards of one split of a prepared dataset."""

    folder: Path
    split: str
    dtype: np.dtype
    shards: list[Shard]
    manifest: dict[str, Any]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Identity of this split's content (from the shard checksums): a loader state only resumes on it."""
        digests = "".join(e["sha256"] for e in self.manifest["splits"][self.split]["shards"])
        return hashlib.sha256(digests.encode()).hexdigest()[:16]


def verify_shard(folder: Path, entry: dict[str, Any], itemsize: int, mode: str) -> None:
    """Size check (truncation) and, with mode "full", sha256 of both files; errors name the damaged file."""
    if mode == "none":
        return
    fix = f"re-run `tokenmill prepare ... --out {folder} --overwrite` to rebuild it"
    for name, size, digest in (
        (entry["file"], entry["tokens"] * itemsize, entry["sha256"]),
        (entry["index"], entry["index_bytes"], entry["index_sha256"]),
    ):
        path = folder / name
        if not path.is_file():
            raise UserError(f"shard file missing: {path} (listed in {folder / MANIFEST}); {fix}")
        actual = path.stat().st_size
        if actual != size:
            raise UserError(
                f"checksum error: {path} has {actual} bytes, the manifest says {size} (truncated or damaged); {fix}"
            )
        if mode == "full" and sha256_file(path) != digest:
            raise UserError(f"checksum error: {path} does not match its sha256 in the manifest (damaged); {fix}")


def check_tokenizer(manifest: dict[str, Any], folder: Path, tokenizer: Any) -> None:
    """Shards only make sense with the tokenizer that wrote them: refuse any other (hash mismatch)."""
    built = manifest["tokenizer"]
    if tokenizer is None or built["hash"] == tokenizer.hash:
        return
    theirs = folder if (folder / "tokenizer.json").is_file() else built["spec"]  # prepare saves a copy there
    raise UserError(
        f"shards in {folder} were built with tokenizer {built['hash']} ({built['spec']}) but this run uses "
        f"{tokenizer.hash} ({getattr(tokenizer, 'name', '?')}); set data.tokenizer={theirs}, or re-run "
        f"`tokenmill prepare SOURCE --tokenizer <yours> --out {folder} --overwrite`"
    )


def open_shards(folder: str | os.PathLike, split: str, tokenizer: Any = None, verify: str = "size") -> ShardSet:
    """Open one split of a prepared dataset: manifest, completeness, tokenizer hash and file checks."""
    if verify not in VERIFY_MODES:
        raise UserError(f"verify={verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    if split not in SPLITS:
        raise UserError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise UserError(
            f"{folder} is an unfinished prepare ({len(manifest['chunks'])} chunks done); re-run the same "
            f"`tokenmill prepare` command to finish it"
        )
    check_tokenizer(manifest, folder, tokenizer)
    dtype = np.dtype(manifest["dtype"])
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise UserError(
            f"{folder} has no {split} documents (eval_fraction="
            f"{manifest['settings'].get('eval_fraction')}); re-run prepare with a larger --eval-fraction"
            if split == "eval"
            else f"{folder} has no train documents: the source was empty"
        )
    shards = []
    for entry in entries:
        verify_shard(folder, entry, dtype.itemsize, verify)
        shards.append(Shard(folder / entry["file"], folder / entry["index"], entry["tokens"], entry["docs"]))
    return ShardSet(folder, split, dtype, shards, manifest)


def build_shard_loader(
    path: str | os.PathLike,
    tokenizer: Any,
    split: str,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1,
    verify: str = "size",
) -> Any:
    """The training loader over one split of a prepared folder (`tokenmill.data.shard_loader.ShardLoader`);
    `shuffle_buffer` > 0 turns on the per-epoch window permutation."""
    from tokenmill.data.shard_loader import ShardLoader

    shard_set = open_shards(path, split, tokenizer, verify)
    return ShardLoader(shard_set, batch_size, seq_len, rank, world_size, num_workers, seed, shuffle=shuffle_buffer > 0)

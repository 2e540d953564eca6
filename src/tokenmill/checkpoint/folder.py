"""Crash-safe checkpoint folders: fsynced writes into a temporary folder, a sha256 manifest written last,
an atomic rename, and verification that names the damaged file.

A folder is a valid checkpoint only if `manifest.json` exists, every file it lists has the recorded size
and sha256, and the folder holds nothing else: a file dropped in later (say a `.metadata` that would send
the loader down another path) makes the folder invalid instead of being read. Because the manifest is the
last file written before the rename, a save killed at any moment leaves either the previous state or a
`.tmp-*` folder that is never chosen. (Pattern: write-temp-then-rename plus fsync of file and directory,
as in SimpleTuner PR #1443.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tokenmill.errors import UserError

# The files of one checkpoint folder
WEIGHTS = "model.safetensors"  # weights of a single-file checkpoint
STATE = "state.pt"  # every other part (weights_only-loadable values)
CONFIG = "config.yaml"  # the resolved run config: rebuilds the model
META = "meta.json"  # step, tokens seen, eval loss, versions, time; `sharded` says how the model was saved
TOKENIZER = "tokenizer.json"  # the run's tokenizer (none for the byte tokenizer, which needs no file)
CHAT_TEMPLATE = "chat_template.jinja"  # the chat template a fine-tuning run trained with (serve and export read it)
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded save's `*.distcp` files
MANIFEST = "manifest.json"  # size and sha256 of every other file; written last

FORMAT = "tokenmill-checkpoint"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"  # a folder being written
OLD_PREFIX = ".old-"  # the previous copy of a step being re-saved, while the new one takes its name
DELETE_PREFIX = ".del-"  # a checkpoint retention is deleting (renamed first, so a kill leaves no half folder)
SHARDS_PREFIX = ".shards-"  # DCP shards of a sharded save before they join the staged folder
STAGING_PREFIXES = (TMP_PREFIX, OLD_PREFIX, DELETE_PREFIX, SHARDS_PREFIX)  # never a checkpoint to read
HASH_CHUNK = 8 << 20  # bytes read at a time while hashing


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to stable storage (directories: so a rename survives power loss)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms (Windows) cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # fsync on a directory is unsupported on some FS
            raise
    finally:
        os.close(fd)


class HashingWriter:
    """A binary file wrapper that hashes and counts what passes through (no read-back to checksum)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += view.nbytes
        return self.handle.write(view)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, ... of the real file
        return getattr(self.handle, name)


def write_file(path: Path, writer: Callable[[IO[bytes]], Any]) -> dict[str, Any]:
    """Create `path`, let `writer` fill it, flush and fsync it; return its manifest entry (bytes, sha256)."""
    with open(path, "wb") as handle:
        hashing = HashingWriter(handle)
        writer(hashing)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
    return {"bytes": hashing.size, "sha256": hashing.digest.hexdigest()}


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    return write_file(path, lambda handle: handle.write(data))


def write_json(path: Path, data: Any) -> dict[str, Any]:
    return write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, written: dict[str, dict[str, Any]] | None = None) -> None:
    """Record size and sha256 of every file in `folder`; must be the last file written.

    `written` holds entries returned by write_file (hashed while writing); other files are read back.
    """
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            known = (written or {}).get(path.name)
            size = path.stat().st_size
            files[path.name] = known if known and known["bytes"] == size else {"bytes": size, "sha256": sha256_of(path)}
    write_json(folder / MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files})


def _plain_name(name: str) -> bool:
    """A file name inside the folder: no separators and no `..` (a manifest never points elsewhere)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace a small JSON file atomically (pointer files like best.json)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    write_json(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _save_error(err: OSError, final: Path) -> UserError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"disk full while saving checkpoint to {final}: free space or lower checkpoint.keep_last "
            f"(earlier checkpoints are intact)"
        )
    return UserError(
        f"could not write checkpoint to {final}: {err.strerror or err} "
        f"(earlier checkpoints are intact; check permissions and free space)"
    )


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder to `final` and fsync the parent, so the rename survives a crash.

    Re-saving a step (e.g. the end of a run resumed at that step) swaps the folders and drops the old one.
    """
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it becomes `final` atomically.

    On any error the temporary folder is removed and earlier checkpoints are untouched; OS errors
    (disk full, permissions) become a one-line UserError.
    """
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        fsync_path(tmp)
        publish_folder(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(err, final) from err
    except RuntimeError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err.__context__, OSError):  # torch.save wraps a failed file write in a RuntimeError
            raise _save_error(err.__context__, final) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: Path) -> None:
    """Delete a file, symlink or folder tree (whatever is there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def delete_folder(folder: Path) -> None:
    """Remove a checkpoint folder so that a kill at any moment leaves either the whole folder or none of it
    under its name: it is renamed to `.del-<name>` first (atomic), then deleted."""
    doomed = folder.parent / f"{DELETE_PREFIX}{folder.name}"
    remove_path(doomed)
    os.replace(folder, doomed)
    fsync_path(folder.parent)
    remove_path(doomed)


def clean_interrupted(parent: Path) -> None:
    """Tidy what a killed save or deletion left in `parent`: unfinished folders and files are removed, and a
    previous copy moved aside by `publish_folder` gets its name back if the new copy never took it."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        name = path.name
        if name.startswith(OLD_PREFIX):
            final = parent / name[len(OLD_PREFIX) :]
            if final.exists():
                remove_path(path)
            else:  # killed between the two renames: the old copy is complete
                os.replace(path, final)
        elif name.startswith((TMP_PREFIX, DELETE_PREFIX, SHARDS_PREFIX)):
            remove_path(path)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, or a UserError saying why there is none."""
    if folder.name.startswith(STAGING_PREFIXES):
        raise UserError(f"{folder} is an unfinished checkpoint (a save was interrupted); use an earlier one")
    if not folder.is_dir():
        raise UserError(
            f"checkpoint {folder} does not exist (pass a checkpoint folder such as "
            f"<out_dir>/checkpoints/step_00000100, or the run's out_dir)"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"checkpoint {folder} is incomplete: {MANIFEST} is missing (the save did not finish); "
            f"use an earlier checkpoint"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"checkpoint file {path} is damaged ({err}); use an earlier checkpoint") from err
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise UserError(f"checkpoint file {path} is not a tokenmill manifest; use an earlier checkpoint")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {folder} was written by a newer tokenmill (format {manifest['version']}); "
            f"upgrade tokenmill to load it"
        )
    return manifest


def verify_folder(folder: Path, deep: bool = True) -> dict[str, Any]:
    """Check every file against the manifest (sizes always; sha256 when `deep`) and that the folder holds
    nothing the manifest does not list; return the manifest."""
    manifest = read_manifest(folder)
    listed = set(manifest["files"]) | {MANIFEST}
    unlisted = sorted(p.name for p in folder.iterdir() if p.name not in listed)
    if unlisted:
        raise UserError(
            f"checkpoint {folder} holds {', '.join(unlisted[:3])}, which its {MANIFEST} does not "
            f"list (added after the save, so it is never read); remove it or use an earlier checkpoint"
        )
    for name, entry in manifest["files"].items():
        if not (
            _plain_name(name)
            and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise UserError(
                f"checkpoint file {folder / MANIFEST} is damaged (bad entry {name!r}); use an earlier checkpoint"
            )
        path = folder / name
        if not path.is_file():
            raise UserError(f"checkpoint file {path} is missing; use an earlier checkpoint")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(
                f"checkpoint file {path} is truncated or damaged ({size} bytes, expected "
                f"{entry['bytes']}); use an earlier checkpoint"
            )
        if deep and sha256_of(path) != entry["sha256"]:
            raise UserError(f"checkpoint file {path} is damaged (sha256 mismatch); use an earlier checkpoint")
    return manifest


def is_sharded(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether a verified folder holds a sharded (DCP) save: its own meta.json must say so and its manifest
    must list DCP's metadata; either without the other is a damaged folder."""
    try:
        sharded = json.loads((folder / META).read_text()).get("sharded") is True
    except (OSError, ValueError, AttributeError):
        sharded = False
    listed = DCP_METADATA in manifest["files"]
    if sharded != listed:
        raise UserError(
            f"checkpoint {folder} is inconsistent ({META} says sharded={sharded} but {MANIFEST} "
            f"{'lists' if listed else 'does not list'} {DCP_METADATA}); use an earlier checkpoint"
        )
    return sharded

"""Sharded checkpoints through torch.distributed.checkpoint (DCP) for FSDP and pipeline runs.

Every rank writes its own shards of the model and optimizer state, in parallel, into one folder; the
folder is keyed by parameter names (`blocks.3.attn.q_proj.weight`), never by rank or layout, so a
checkpoint saved with FSDP on 2 ranks loads in a single process, with DDP, or with pp=2, and back.
The optimizer state is saved flattened per parameter (`state.<name>.exp_avg`), which is what makes it
layout-free too.

In a checkpoint folder (see checkpoint/manager.py) the shards sit beside the small files:
  .metadata, __<rank>_0.distcp   DCP model + optimizer state ("model.*", "optim.*")
`write_shards` puts them in a `.shards-<name>` folder first (every rank, optionally in the background);
the Checkpointer then moves them into the staged folder on rank 0 and writes the manifest last.

Safe loading: nothing here runs a plain unpickler. DCP's `.metadata` is a pickle that torch reads with
`pickle.load`; `read_dcp_metadata` reads it with an unpickler that can only build DCP's own metadata
classes (https://docs.python.org/3/library/pickle.html#restricting-globals) and checks that every shard
it points at is a file of the same folder. Non-tensor values are read with `torch.load(weights_only=True)`
(`SafeLoadPlanner`), tensors already are.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from tokenmill.checkpoint.find import read_meta
from tokenmill.checkpoint.folder import (
    CHAT_TEMPLATE,
    CONFIG,
    DCP_METADATA,
    MANIFEST,
    META,
    TMP_PREFIX,
    TOKENIZER,
    WEIGHTS,
    staged_folder,
    write_bytes,
    write_file,
    write_json,
    write_manifest,
)
from tokenmill.checkpoint.weights import write_safetensors
from tokenmill.errors import UserError

# Every global a DCP metadata pickle refers to: DCP's metadata dataclasses, the shapes, dtypes and layouts in
# them, and the checkpoint path DCP records (a pathlib path). Nothing else can be built, so nothing runs.
DCP_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),  # Python >= 3.13
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata: any other global (a function to call, a class to construct) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP checkpoint metadata")


def read_dcp_metadata(folder: Path) -> Any:
    """The DCP `Metadata` of a sharded checkpoint folder, read without running code; UserError otherwise."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / DCP_METADATA
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
        OSError,
    ) as err:
        raise UserError(
            f"checkpoint file {path} cannot be read safely ({str(err)[:200] or type(err).__name__}): "
            f"it is damaged or was not written by tokenmill; use an earlier checkpoint"
        ) from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(storage, dict):
        raise UserError(f"checkpoint file {path} is not DCP checkpoint metadata; use an earlier checkpoint")
    files = {p.name for p in folder.iterdir() if p.is_file()}
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or name not in files:
            raise UserError(
                f"checkpoint file {path} points at shard {name!r}, which is not a file of {folder}; "
                f"use an earlier checkpoint"
            )
    return metadata


def _safe_reader(folder: Path) -> Any:
    """A DCP FileSystemReader over `folder` that returns metadata read by `read_dcp_metadata`.

    The metadata is read (and refused) here, before DCP starts: inside `dcp.load` a failed read is caught,
    logged with a traceback and retried on per-rank files. `read_metadata` takes no keyword arguments, so
    DCP never tries that per-rank fallback either.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_dcp_metadata(folder)

    class SafeReader(FileSystemReader):
        def read_metadata(self) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def _planner_cls() -> type:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but non-tensor values are read with weights_only=True (no unpickled code)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes a single process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=True)


def get_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} with names free of wrapper prefixes (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_options())}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


# ---------------------------------------------------------------------------------------------------
# Save


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


@dataclass
class ShardWrite:
    """Shards of one checkpoint being written (async) or written into `folder` by every rank."""

    folder: Path
    future: Future | None = None

    def wait(self) -> None:
        """Block until this rank's shards (and, on rank 0, DCP's .metadata) are on disk."""
        if self.future is not None:
            future, self.future = self.future, None
            future.result()

    def move_into(self, dest: Path) -> None:
        """Rank 0: move every written file into checkpoint folder `dest` (same filesystem: renames)."""
        self.wait()
        for path in sorted(self.folder.iterdir()):
            os.replace(path, dest / path.name)
        shutil.rmtree(self.folder, ignore_errors=True)


def write_shards(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    async_save: bool = False,
    process_group: tdist.ProcessGroup | None = None,
) -> ShardWrite:
    """Every rank writes its model + optimizer shards into `folder` (a collective; emptied first by rank 0).

    With `async_save` the state is staged to host memory before this returns and written by a background
    thread; `wait()` (or `move_into`) blocks until it is on disk. `process_group` should then be a gloo
    group kept for checkpoints, so background writes never share a communicator with training.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if _rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # left by a save that was killed
        folder.mkdir(parents=True)
    _barrier()  # the folder exists before any rank writes into it
    state = get_sharded_state(model, optimizer)
    try:
        if async_save:
            return ShardWrite(folder, dcp.async_save(state, checkpoint_id=str(folder), process_group=process_group))
        with _quiet():
            dcp.save(state, checkpoint_id=str(folder), no_dist=not tdist.is_initialized())
    except OSError as err:
        raise UserError(
            f"could not write sharded checkpoint {folder}: {err.strerror or err} (earlier checkpoints "
            f"are intact; check free space and permissions)"
        ) from err
    return ShardWrite(folder)


# ---------------------------------------------------------------------------------------------------
# Load


def load_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, strict: bool = True
) -> None:
    """Load model (+ optimizer) state from a verified sharded folder into this rank's layout, in place.

    Works in any layout (single process, DDP, FSDP on any world size, pipeline stages): each rank reads
    the slices it holds.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
    from torch.distributed.optim import ZeroRedundancyOptimizer

    folder = Path(folder)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        raise UserError(
            f"{folder} is a sharded checkpoint, which parallel.strategy=zero1 cannot resume; resume it "
            f"with parallel.strategy=fsdp, ddp or single"
        )
    reader = _safe_reader(folder)
    state = get_sharded_state(model, optimizer)
    try:
        with _quiet():
            dcp.load(
                state,
                storage_reader=reader,
                planner=_planner_cls()(allow_partial_load=not strict),
                no_dist=not tdist.is_initialized(),
            )
    except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"sharded checkpoint {folder} does not fit this model/optimizer ({_cause(err)}); resume "
            f"with the same model.* and optim.* settings"
        ) from err
    opts = StateDictOptions(flatten_optimizer_state_dict=True, strict=strict)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, Any] | None = None,
) -> None:
    """Load a single-process checkpoint's full state into a sharded layout (FSDP shards, pipeline stages).

    Every rank passes the full state and keeps its own slices. The optimizer state is in torch's native
    format (parameters by index); indices are mapped to names through the groups' `names` (tokenmill's
    optimizers record them) or, without names, through the parameter order, which must then match.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    local = set(get_sharded_state(model, None)["model"])
    missing = sorted(local - set(model_sd))
    if missing:
        raise UserError(
            f"checkpoint weights lack {', '.join(missing[:4])}: the model config changed since it was saved"
        )
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, {k: v for k, v in model_sd.items() if k in local}, options=opts)
    if optimizer is None or optim_sd is None:
        return
    current = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    names_now = [name for g in current["param_groups"] for name in g["params"]]
    saved_ids = [i for g in optim_sd["param_groups"] for i in g["params"]]
    if all("names" in g for g in optim_sd["param_groups"]):
        saved_names = [n for g in optim_sd["param_groups"] for n in g["names"]]
    elif len(saved_ids) == len(names_now):
        saved_names = names_now
    else:
        raise UserError(
            "the checkpoint's optimizer state does not match this model's parameters; resume with the "
            "same model.* and optim.* settings"
        )
    if len(saved_names) != len(saved_ids):
        raise UserError(
            "the checkpoint's optimizer state is damaged (its parameter names and ids differ in number); "
            "use an earlier checkpoint"
        )
    by_id = dict(zip(saved_ids, saved_names, strict=True))
    keep = set(names_now)
    state = {by_id[i]: v for i, v in optim_sd["state"].items() if by_id.get(i) in keep}
    groups = []
    for g in optim_sd["param_groups"]:
        params = [by_id[i] for i in g["params"] if by_id[i] in keep]
        if params:
            # `names` and `roles` describe the saving layout's groups (a pipeline stage holds fewer), and DCP
            # flattens lists element-wise: a longer saved list would name entries this layout does not have
            groups.append({**{k: v for k, v in g.items() if k not in ("names", "roles")}, "params": params})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=opts)


def _cause(err: BaseException) -> str:
    """The innermost error line of a DCP exception (it wraps each rank's traceback in one message)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "Error:" in ln or "Exception:" in ln]
    return (lines[-1] if lines else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)[:300]


# ---------------------------------------------------------------------------------------------------
# Consolidate


def read_full_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's weights of a verified sharded folder on the CPU (no process group needed).

    Reads only the "model.*" entries (not the optimizer), so it needs host memory for the weights once.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    reader = _safe_reader(folder)
    shapes = {
        key[len("model.") :]: item
        for key, item in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }
    if not shapes:
        raise UserError(f"sharded checkpoint {folder} holds no model weights")
    # the weights are stored in the shard files, so they cannot be larger: a metadata file that claims more
    # is damaged (and would otherwise make us allocate whatever it says)
    claimed = sum(item.size.numel() * item.properties.dtype.itemsize for item in shapes.values())
    stored = sum(p.stat().st_size for p in folder.glob("*.distcp"))
    if claimed > stored:
        raise UserError(
            f"checkpoint file {folder / DCP_METADATA} claims {claimed} bytes of weights but the shards "
            f"hold {stored}: it is damaged; use an earlier checkpoint"
        )
    tensors = {name: torch.empty(item.size, dtype=item.properties.dtype) for name, item in shapes.items()}
    with _quiet():
        dcp.load(
            {"model": tensors}, storage_reader=reader, planner=_planner_cls()(allow_partial_load=True), no_dist=True
        )
    return tensors


def consolidate(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Merge the model shards of a verified sharded checkpoint into one file or one loadable folder.

    `out` ending in `.safetensors`: the weights alone, under the plain model's names. Any other `out`: a
    single-file checkpoint folder (weights, config, tokenizer, meta, manifest) that `tokenmill.load_model`
    and every command taking a checkpoint accept. An existing `out` is replaced only with `overwrite`, and
    then only a file or another checkpoint folder, never a folder of other things.
    """
    folder, out = Path(folder), Path(out)
    as_file = out.suffix == ".safetensors"
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists: choose another output, or pass --force to replace it")
        if as_file and not out.is_file():
            raise UserError(f"{out} is a folder, not a .safetensors file: choose another output")
        if not as_file and not (out / MANIFEST).is_file():
            raise UserError(
                f"{out} exists and is not a checkpoint folder, so it is not replaced: choose another output"
            )
    tensors = {name: tensor.contiguous() for name, tensor in read_full_weights(folder).items()}
    if as_file:
        tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_file(tmp, lambda handle: write_safetensors(handle, tensors, {"format": "pt"}))
            os.replace(tmp, out)
        except OSError as err:
            raise UserError(
                f"could not write {out}: {err.strerror or err} (check the folder, free space and permissions)"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        return out
    meta = {**read_meta(folder), "sharded": False, "consolidated_from": str(folder)}
    with staged_folder(out) as tmp:
        written = {
            WEIGHTS: write_file(tmp / WEIGHTS, lambda handle: write_safetensors(handle, tensors, {"format": "pt"}))
        }
        for name in (CONFIG, TOKENIZER, CHAT_TEMPLATE):
            if (folder / name).is_file():
                written[name] = write_bytes(tmp / name, (folder / name).read_bytes())
        written[META] = write_json(tmp / META, meta)
        write_manifest(tmp, meta["step"] if isinstance(meta.get("step"), int) else 0, written)
    return out

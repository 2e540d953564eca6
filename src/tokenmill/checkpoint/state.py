"""What goes inside a checkpoint: weights without wrapper prefixes or tied duplicates, RNG states, and
state that `torch.load(weights_only=True)` can read back without unpickling any code.

`weights_only=True` only rebuilds tensors, numbers, strings, None and plain containers, so every value is
converted to those here (NumPy arrays become tensors, RNG tuples become lists) and anything else is
refused with the path of the offending value.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenmill.errors import UserError

# Key components added by wrappers: torch.compile (`_orig_mod`, also inside per-block compiled blocks) and
# activation checkpointing (`_checkpoint_wrapped_module`); DDP adds a leading `module.`. Saved keys never
# carry them (STYLE rule 6).
INNER_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")
MAX_NAMED_KEYS = 6  # how many differing keys an error message lists before "+N more"


# ---------------------------------------------------------------------------------------------------
# Weights

def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def clean_key(key: str) -> str:
    """Drop wrapper components: a leading `module.` (DDP) and `_orig_mod` / `_checkpoint_wrapped_module`
    anywhere (per-block compile and activation checkpointing wrap inner modules)."""
    parts = key.split(".")
    while parts and parts[0] in ("module", "_orig_mod", "_checkpoint_wrapped_module"):
        parts = parts[1:]
    return ".".join(p for p in parts if p not in INNER_WRAPPERS)


def weights_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, tied map {duplicate key: kept key}).

    safetensors refuses tensors that share memory, so each storage is written once; tied parameters
    (input embedding = output head) are recorded in the map and re-filled on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for raw_key, value in unwrap_model(model).state_dict(keep_vars=False).items():
        key = clean_key(raw_key)
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()), value.dtype, str(value.device))
        if value.numel() > 0 and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach()
    return tensors, tied


# safetensors format (https://github.com/huggingface/safetensors#format): u64 little-endian header size,
# a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded to 8 bytes,
# then the raw little-endian tensor bytes. Written here tensor by tensor so a multi-GB model never
# needs a second copy in memory and every write error surfaces (e.g. disk full).
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(handle: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream `tensors` to an open binary file in safetensors format (loadable by safetensors.load_file)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # big dtypes first: aligned
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in order:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handle.write(struct.pack("<Q", len(text)))
    handle.write(text)
    for key in order:
        # (.cpu() on GPU is a host-device sync; this runs only at checkpoint time, one tensor at a time)
        flat = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            handle.write(memoryview(flat.view(torch.uint8).numpy()))


def retie(tensors: dict[str, torch.Tensor], tied: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Re-insert the tied duplicates dropped at save time."""
    out = dict(tensors)
    for dup, kept in tied.items():
        if kept in out:
            out[dup] = out[kept]
    return out


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f" (+{len(keys) - MAX_NAMED_KEYS} more)" if len(keys) > MAX_NAMED_KEYS else "")


def check_weights_fit(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise a UserError naming missing, unexpected and shape-mismatched keys before loading."""
    expected = {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(f"{k} {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if problems:
        raise UserError(f"checkpoint {where} does not fit the model ({'; '.join(problems)}): the model config "
                        f"changed since it was saved; resume with the same model.* settings or start a new out_dir")


def load_weights_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into the (possibly wrapped) model in place, so ties and devices are kept."""
    check_weights_fit(model, tensors, where)
    plain = unwrap_model(model)
    by_clean = {clean_key(k): k for k in plain.state_dict()}
    plain.load_state_dict({by_clean[k]: v for k, v in tensors.items()}, strict=True)


# ---------------------------------------------------------------------------------------------------
# RNG states (Python, NumPy, torch CPU, every CUDA device)

def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors / lists / numbers (weights_only-loadable)."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng; CUDA states are restored for as many devices as both runs have."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["bit_generator"], npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ---------------------------------------------------------------------------------------------------
# weights_only-safe values

def to_safe(value: Any, path: str = "state") -> Any:
    """A copy of `value` made only of tensors, primitives, lists, tuples and dicts.

    NumPy arrays become tensors (uint32 widened to int64, which torch stores fully), NumPy scalars
    become Python numbers; anything else raises a TypeError naming where it sits.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu") if value.device.type != "cpu" else value.detach()
    if isinstance(value, np.ndarray):
        array = value.astype(np.int64) if value.dtype in (np.uint32, np.uint16) else value
        return torch.from_numpy(np.ascontiguousarray(array).copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"cannot store key {key!r} of {path} in a checkpoint: keys must be str or int")
            out[key] = to_safe(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        items = [to_safe(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"cannot store {path} ({type(value).__name__}) in a checkpoint: use tensors, numbers, strings, "
                    f"lists or dicts (checkpoints are loaded with weights_only=True)")

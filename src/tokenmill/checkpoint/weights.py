"""Model weights in a checkpoint: streamed safetensors without wrapper prefixes, tied tensors stored once,
and a fit check that names every key that no longer matches the model.

safetensors holds raw tensors and a JSON header only (https://github.com/huggingface/safetensors), so
reading weights never runs code; a damaged header is reported as one line.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from tokenmill.checkpoint.folder import WEIGHTS
from tokenmill.errors import UserError
from tokenmill.parallel.wrappers import canonical_name, unwrap

MAX_NAMED_KEYS = 6  # how many differing keys an error message lists before "+N more"

# safetensors format (https://github.com/huggingface/safetensors#format): u64 little-endian header size,
# a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded to 8 bytes,
# then the raw little-endian tensor bytes. Written here tensor by tensor so a multi-GB model never
# needs a second copy in memory and every write error surfaces (e.g. disk full).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def untie(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, tied map {duplicate key: kept key}) of a state dict.

    safetensors refuses tensors that share memory, so each storage is written once; tied parameters
    (input embedding = output head) are recorded in the map and re-filled on load by `retie`.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
            str(value.device),
        )
        if value.numel() > 0 and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach()
    return tensors, tied


def write_safetensors(handle: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream `tensors` to an open binary file in safetensors format (loadable by safetensors.load_file)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # big dtypes first: aligned
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in order:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
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


def write_weights(handle: IO[bytes], state: Mapping[str, torch.Tensor]) -> None:
    """A model's state dict as safetensors, tied tensors once; the tied map travels as JSON (safetensors
    metadata is str -> str)."""
    tensors, tied = untie(state)
    write_safetensors(handle, tensors, {"format": "pt", "tied": json.dumps(tied)})


def retie(tensors: dict[str, torch.Tensor], tied: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Re-insert the tied duplicates dropped at save time."""
    out = dict(tensors)
    for dup, kept in tied.items():
        if kept in out:
            out[dup] = out[kept]
    return out


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder `folder` on the CPU, with tied duplicates filled back in."""
    from safetensors import SafetensorError, safe_open

    file = Path(folder) / WEIGHTS
    if not file.is_file():
        raise UserError(f"checkpoint {folder} holds no {WEIGHTS}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            tied = json.loads((handle.metadata() or {}).get("tied", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(
            f"checkpoint file {file} is damaged and cannot be read ({str(err)[:200]}); use an earlier checkpoint"
        ) from None
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise UserError(
            f"checkpoint file {file} has a damaged header (its tied-weights map is not a mapping of "
            f"names); use an earlier checkpoint"
        )
    return retie(tensors, tied)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f" (+{len(keys) - MAX_NAMED_KEYS} more)" if len(keys) > MAX_NAMED_KEYS else "")


def check_weights_fit(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise a UserError naming missing, unexpected and shape-mismatched keys before loading."""
    expected = {canonical_name(k): v for k, v in unwrap(model).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if problems:
        raise UserError(
            f"the weights do not fit the model ({'; '.join(problems)}): the model config changed since "
            f"they were saved; resume with the same model.* settings or start a new out_dir"
        )


def load_weights_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` into the (possibly wrapped) model in place, so ties and devices are kept."""
    check_weights_fit(model, tensors)
    plain = unwrap(model)
    by_canonical = {canonical_name(k): k for k in plain.state_dict()}
    plain.load_state_dict({by_canonical[k]: v for k, v in tensors.items()}, strict=True)

"""Values a checkpoint's `state.pt` may hold, and reading them back without running code.

`torch.load(weights_only=True)` only rebuilds tensors, numbers, strings, None and plain containers, so every
value is converted to those here (NumPy arrays become tensors, RNG tuples become lists) and anything else
is refused with the path of the offending value. RNG states of Python, NumPy, torch and CUDA are captured
and restored in the same safe form.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.errors import UserError

# ---------------------------------------------------------------------------------------------------
# RNG states (Python, NumPy, torch CPU, every CUDA device)


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors / lists / numbers (weights_only-loadable)."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
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
    np.random.set_state(
        (npst["bit_generator"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
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
    raise TypeError(
        f"cannot store {path} ({type(value).__name__}) in a checkpoint: use tensors, numbers, strings, "
        f"lists or dicts (checkpoints are loaded with weights_only=True)"
    )


def load_values(path: Path) -> dict[str, Any]:
    """A `state.pt` read with torch's restricted unpickler; damage or a refused object is one UserError line.

    The manifest only proves the file is the one that was saved: a file damaged before its manifest was
    written (or replaced together with a recomputed manifest) must still fail cleanly here.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise UserError(
            f"checkpoint file {path} cannot be read safely ({_reason(err)}): it is damaged or was "
            f"not written by tokenmill; use an earlier checkpoint"
        ) from None
    if not isinstance(blob, dict):
        raise UserError(f"checkpoint file {path} is not a tokenmill state file; use an earlier checkpoint")
    return blob


def _reason(err: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "unsupported" in line.lower() or "failed reading" in line]
    return (useful or lines or [type(err).__name__])[0][:200]

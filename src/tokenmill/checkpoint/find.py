"""Which checkpoint a path means, answered once for every reader: `tokenmill.load_model`, `--resume`,
`tokenmill checkpoint consolidate` and every command that takes a checkpoint.

A path may name a checkpoint folder (`<out_dir>/checkpoints/step_00000100`), a run folder (`<out_dir>`) or
its `checkpoints/` folder; `which` then picks the newest valid checkpoint ("latest") or the one with the
lowest eval loss ("best"). Whatever is returned has been verified against its manifest.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from tokenmill.checkpoint.folder import MANIFEST, META, STAGING_PREFIXES, verify_folder
from tokenmill.errors import UserError

CHECKPOINTS = "checkpoints"  # the folder of a run that holds its checkpoints
STEP_PREFIX = "step_"
BEST_POINTER = "best.json"  # {"name", "step", "eval_loss"} of the best checkpoint by eval loss
WHICH = ("latest", "best")


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a `step_00000100` folder name, None for anything else (tmp folders, best.json)."""
    digits = name[len(STEP_PREFIX) :]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Every `step_*` folder of a checkpoints folder (valid or not), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in checkpoints.iterdir() if p.is_dir()]
    return [path for _, path in sorted((step, path) for step, path in found if step is not None)]


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, or {} when it is missing or unreadable."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def scored(checkpoints: Path) -> list[tuple[float, Path]]:
    """(eval loss, folder) of complete checkpoints saved with an eval loss, best first (newest on ties)."""
    found = []
    for path in list_checkpoints(checkpoints):
        loss = finite_or_none(read_meta(path).get("eval_loss")) if (path / MANIFEST).is_file() else None
        if loss is not None:
            found.append((loss, path))
    return sorted(found, key=lambda item: (item[0], -(parse_step(item[1].name) or 0)))


def best_pointer(checkpoints: Path) -> Path | None:
    """The folder best.json names, if it names one of this folder's checkpoints."""
    try:
        name = json.loads((checkpoints / BEST_POINTER).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return checkpoints / name if isinstance(name, str) and parse_step(name) is not None else None


def checkpoints_folder(path: Path) -> Path | None:
    """The checkpoints folder `path` names (a run folder or the folder itself), or None for anything else."""
    if path.name == CHECKPOINTS and path.is_dir() and not (path / MANIFEST).exists():
        return path
    if (path / CHECKPOINTS).is_dir() and not (path / MANIFEST).exists():
        return path / CHECKPOINTS
    return None


def _first_valid(candidates: list[Path], problems: list[str]) -> Path | None:
    for path in candidates:
        try:
            verify_folder(path)
        except UserError as err:
            problems.append(str(err))
            continue
        return path
    return None


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that verifies; None when none was ever saved.

    Damaged or partial ones are skipped with a warning naming them; if every one is damaged, a UserError.
    """
    found = list_checkpoints(checkpoints)
    problems: list[str] = []
    latest = _first_valid(list(reversed(found)), problems)
    if latest is None and found:
        raise UserError(f"no valid checkpoint in {checkpoints}: {problems[0]}")
    if problems:
        warnings.warn(f"skipped damaged checkpoints: {'; '.join(problems)}", stacklevel=2)
    return latest


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The valid checkpoint with the lowest eval loss (best.json, else a scan of meta.json files), or None."""
    pointer = best_pointer(checkpoints)
    candidates = ([pointer] if pointer is not None else []) + [path for _, path in scored(checkpoints)]
    problems: list[str] = []
    best = _first_valid(candidates, problems)
    if problems:
        warnings.warn(f"skipped damaged checkpoints: {'; '.join(problems)}", stacklevel=2)
    return best


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The verified checkpoint folder `path` names: itself, or the latest valid / best one of a run folder."""
    if which not in WHICH:
        raise UserError(f"which={which!r} is not allowed: choose one of {', '.join(WHICH)}")
    path = Path(path)
    checkpoints = checkpoints_folder(path)
    if checkpoints is not None:
        found = latest_checkpoint(checkpoints) if which == "latest" else best_checkpoint(checkpoints)
        if found is None:
            what = "valid checkpoint with an eval loss" if which == "best" else "valid checkpoint"
            raise UserError(f"no {what} in {checkpoints.parent}: the run has not saved one yet")
        return found
    named_like_one = parse_step(path.name) is not None or path.name.startswith(STAGING_PREFIXES)
    if path.is_dir() and not named_like_one and not (path / MANIFEST).exists():
        raise UserError(
            f"{path} is neither a checkpoint folder (no {MANIFEST}) nor a run folder (no {CHECKPOINTS}/ "
            f"folder): pass <out_dir> or <out_dir>/{CHECKPOINTS}/step_N"
        )
    verify_folder(path)
    return path

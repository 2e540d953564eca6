"""Choosing what to resume (SPEC C5) and protecting run folders from being overwritten by a new run."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from tokenmill.errors import UserError

# Files a run writes besides its checkpoints; `--overwrite` removes them (never the tokenizer cache).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "wandb", "wandb_id.txt")


def resolve_resume(run_dir: str | Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume: None (fresh start), the latest valid one (`True`/"latest"), or PATH.

    PATH may be a checkpoint folder or a run folder (its latest valid checkpoint). `--resume` on a run
    with no checkpoints yet starts fresh (so a restarted job can always pass it); one whose
    checkpoints are all damaged is an error.
    """
    from tokenmill.checkpoint.manager import CHECKPOINTS, MANIFEST, Checkpointer

    if resume is None or resume is False or resume == "":
        return None
    if resume is True or resume in ("latest", "auto"):
        return _latest_or_error(Path(run_dir), required=False)
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir() and not (path / MANIFEST).exists():
        return _latest_or_error(path, required=True)
    return Checkpointer(path.parent.parent).verify(path)


def _latest_or_error(run_dir: Path, required: bool) -> Path | None:
    from tokenmill.checkpoint.manager import CHECKPOINTS, Checkpointer

    checkpointer = Checkpointer(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = checkpointer.latest_valid()
    if latest is None and (required or checkpointer.list_checkpoints()):
        why = checkpointer.problems[0] if checkpointer.problems else f"{run_dir / CHECKPOINTS} holds no checkpoint"
        raise UserError(f"nothing to resume in {run_dir}: {why}")
    if checkpointer.problems:
        warnings.warn(f"skipped damaged checkpoints: {'; '.join(checkpointer.problems)}", stacklevel=3)
    return latest


def prepare_run_dir(run_dir: str | Path, resume: str | bool | None = None, overwrite: bool = False,
                    is_main: bool = True) -> Path | None:
    """Check the run folder for a new or resumed run; return the checkpoint to resume (or None).

    A new run over another run's checkpoints is refused unless `resume` or `overwrite`. With `overwrite`
    the previous run's outputs (checkpoints, metrics, TensorBoard, W&B id) are deleted; without
    checkpoints, an old metrics.jsonl is renamed aside so two runs never mix in one file. Only the main
    process (`is_main`) changes files; every process gets the same answer.
    """
    from tokenmill.checkpoint.manager import Checkpointer

    run_dir = Path(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one of them")
    if resume:
        return resolve_resume(run_dir, resume)
    existing = Checkpointer(run_dir).list_checkpoints()
    if existing and not overwrite:
        raise UserError(f"{run_dir} already holds another run's checkpoints ({existing[-1].name}, {len(existing)} in "
                        f"all): pass --resume to continue it, --overwrite to replace it, or choose another "
                        f"train.out_dir")
    if not is_main:
        return None
    if overwrite:
        for name in RUN_OUTPUTS:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        index = 1
        while (run_dir / f"metrics.{index}.jsonl").exists():
            index += 1
        os.replace(metrics, run_dir / f"metrics.{index}.jsonl")
    return None

"""The run folder (`train.out_dir`): start it, resume it, or take it over with `--overwrite`, losing nothing by
mistake.

`prepare_run_dir` decides and checks everything before the run is set up, and changes no file: the folder
must be a writable folder with free space; a new run is refused over another run's checkpoints unless
`--overwrite`; `--resume PATH` is refused when it would replace later checkpoints of this folder or mix in
another run's, naming them, unless `--overwrite`. `RunDir.commit()`, called once set-up has succeeded
(config, tokenizer, model, checkpoint loaded), makes the changes: it removes only what tokenmill's
writers say they write (`OUTPUTS` of checkpoint/manager.py, metrics/sinks.py and jobs/control.py), never a
user's own files in `checkpoints/`, `tb/`, `wandb/` or `control/`, and moves an old metrics.jsonl aside so
two runs never share one file.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.checkpoint.find import (
    CHECKPOINTS,
    best_pointer,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    parse_step,
)
from tokenmill.checkpoint.folder import delete_folder, remove_path
from tokenmill.checkpoint.manager import OUTPUTS as CHECKPOINT_OUTPUTS
from tokenmill.errors import UserError
from tokenmill.jobs.control import OUTPUTS as JOB_OUTPUTS
from tokenmill.metrics.sinks import JSONL_NAME
from tokenmill.metrics.sinks import OUTPUTS as SINK_OUTPUTS

PROBE_PREFIX = ".tokenmill-write-test-"  # written and removed at set-up: a full disk fails there
PROBE_BYTES = 1 << 20
OUTPUTS = CHECKPOINT_OUTPUTS + SINK_OUTPUTS + JOB_OUTPUTS + (f"{PROBE_PREFIX}*",)  # every path pattern a run writes
LATEST = (True, "latest", "auto")  # --resume without a path: this folder's latest valid checkpoint
MAX_NAMED = 4  # checkpoints named in an error before "+N more"


@dataclass
class RunDir:
    """What a run does with its folder: the checkpoint to resume, and the changes `commit()` makes."""

    path: Path
    resume_from: Path | None = None  # verified checkpoint to resume; None for a fresh start
    remove: list[Path] = field(default_factory=list)  # outputs of the run being replaced (--overwrite)
    move_metrics_aside: bool = False  # an earlier run's metrics.jsonl, kept as metrics.N.jsonl

    def commit(self) -> None:
        """Make the changes (main process only): call once set-up succeeded, before anything is written."""
        for path in self.remove:
            if parse_step(path.name) is not None and path.is_dir():
                delete_folder(path)  # renamed first: a kill never leaves half a checkpoint under its name
            elif path.exists() or path.is_symlink():
                remove_path(path)
        for folder in {path.parent for path in self.remove if path.parent != self.path}:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # a writer's folder (checkpoints/, tb/, wandb/) that held only its own files
        metrics = self.path / JSONL_NAME
        if self.move_metrics_aside and metrics.is_file():
            index = 1
            while (self.path / f"metrics.{index}.jsonl").exists():
                index += 1
            os.replace(metrics, self.path / f"metrics.{index}.jsonl")


def prepare_run_dir(
    run_dir: str | Path, resume: str | bool | None = None, overwrite: bool = False, is_main: bool = True
) -> RunDir:
    """Check the run folder for a new or resumed run and decide what to resume and replace; change nothing.

    `resume`: None/False (fresh start), True/"latest" (this folder's latest valid checkpoint; a folder with
    none yet starts fresh, so a restarted job can always pass it) or a checkpoint / run folder PATH. Only
    the main process (`is_main`) checks writability and gets changes to make; every process gets the same
    checkpoint to resume.
    """
    path = Path(run_dir)
    if resume in LATEST and overwrite:
        raise UserError(
            "--resume and --overwrite contradict each other: pass one of them (--resume PATH "
            "--overwrite resumes PATH and replaces this out_dir's later checkpoints)"
        )
    if is_main:
        check_writable(path)
    checkpoints = path / CHECKPOINTS
    if resume in LATEST:
        return RunDir(path, resume_from=latest_checkpoint(checkpoints))
    if resume:
        target = find_checkpoint(resume)
        run = RunDir(path, resume_from=target)
        replaced = _replaced_by_resume(path, target)
        if replaced and not overwrite:
            raise UserError(_refusal(path, target, replaced))
        if is_main and overwrite:
            run.remove = _outputs(path) if target.parent.resolve() != checkpoints.resolve() else _later(path, target)
        return run
    existing = list_checkpoints(checkpoints)
    if existing and not overwrite:
        raise UserError(
            f"{path} already holds another run's checkpoints ({existing[-1].name}, {len(existing)} in "
            f"all): pass --resume to continue it, --overwrite to replace it, or choose another "
            f"train.out_dir"
        )
    if not is_main:
        return RunDir(path)
    if overwrite:
        return RunDir(path, remove=_outputs(path))
    return RunDir(path, move_metrics_aside=(path / JSONL_NAME).is_file())


def check_writable(path: Path) -> None:
    """A one-line UserError unless `path` is (or can be made) a writable folder with room for a write."""
    if path.exists() and not path.is_dir():
        raise UserError(f"train.out_dir={path} is a file, not a folder: choose another train.out_dir")
    probe = path / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk holding train.out_dir={path} is full: free space or choose another train.out_dir"
            ) from None
        raise UserError(
            f"train.out_dir={path} is not writable ({err.strerror or err}): fix its permissions or "
            f"choose another train.out_dir"
        ) from None
    finally:
        probe.unlink(missing_ok=True)


def _outputs(path: Path) -> list[Path]:
    """Everything tokenmill's writers wrote under `path` (their OUTPUTS patterns), nothing else."""
    return sorted({found for pattern in OUTPUTS for found in path.glob(pattern)})


def _later(path: Path, target: Path) -> list[Path]:
    """Checkpoints of this folder after `target` (a checkpoint of this folder), and best.json if it names one."""
    step = parse_step(target.name) or 0
    later = [p for p in list_checkpoints(path / CHECKPOINTS) if (parse_step(p.name) or 0) > step]
    best = best_pointer(path / CHECKPOINTS)
    return later + ([path / CHECKPOINTS / "best.json"] if best in later else [])


def _replaced_by_resume(path: Path, target: Path) -> list[Path]:
    """The checkpoints that resuming `target` into `path` would replace or mix with another run's."""
    checkpoints = path / CHECKPOINTS
    if target.parent.resolve() == checkpoints.resolve():
        return [p for p in _later(path, target) if parse_step(p.name) is not None]
    return list_checkpoints(checkpoints)


def _refusal(path: Path, target: Path, replaced: list[Path]) -> str:
    names = ", ".join(p.name for p in replaced[:MAX_NAMED]) + (
        f" (+{len(replaced) - MAX_NAMED} more)" if len(replaced) > MAX_NAMED else ""
    )
    if target.parent.resolve() == (path / CHECKPOINTS).resolve():
        return (
            f"--resume {target} would replace {len(replaced)} later checkpoint(s) of {path} ({names}) and its "
            f"metrics after {target.name}: pass --overwrite to replace them, or resume into a new train.out_dir"
        )
    return (
        f"--resume {target} would mix another run's checkpoints into {path}, which holds {names}: pass "
        f"--overwrite to replace them, or choose another train.out_dir"
    )

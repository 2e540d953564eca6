"""Ablation grids: one training run per (cell, seed) as a `python -m tokenmill train` child, and a results table.

A cell is one choice of value per `--grid key=v1,v2` key; every cell runs once per seed in
`OUT/<cell>/seed<S>/` (its output in `train.log`, its settings in `cell.json`). Every child gets `--resume`, so
a rerun skips finished runs, continues stopped or killed ones from their last checkpoint, and starts the rest.
A folder that holds a run of other settings is refused before anything starts. Results: `ablation.md` and
`ablation.json` (mean +- std over seeds of the final eval loss and bits per byte, tokens/s, parameters) and
`ablation.png` (loss curves and final eval losses).

Configs are resolved here (tokenmill.config imports no torch) so a bad key fails before the first run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.analysis.compare import config_diff
from tokenmill.analysis.runs import Run, load_run
from tokenmill.analysis.summary import human, markdown_table, summarize
from tokenmill.errors import UserError

# Run settings the grid runner owns (train's own keys; they override anything the base sets).
RUN_KEYS = {"seed": "train.seed", "max_steps": "train.max_steps", "out_dir": "train.out_dir"}
CELL_FILE = "cell.json"
LOG_FILE = "train.log"
TOKENIZER_CACHE = "tokenizer"  # where `train` caches a trained BPE inside its run folder
DONE = ("completed", "diverged", "nonfinite")  # outcomes a rerun would only repeat
RESULT_FILES = {"json": "ablation.json", "markdown": "ablation.md", "plot": "ablation.png"}
AGGREGATES = ("eval_loss", "eval_bpb", "tokens_per_s", "params", "final_loss")


@dataclass(frozen=True)
class Base:
    """The config every cell starts from: presets, a YAML file and overrides (as `tokenmill train` takes them)."""

    presets: tuple[str, ...] = ()
    config_file: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass
class Job:
    cell: str
    settings: dict[str, str]  # grid key -> value text
    seed: int
    folder: Path
    overrides: list[str]
    config: dict[str, Any]  # the resolved config (what cell.json records)
    uses_bpe: bool
    status: str = "pending"
    exit_code: int | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class Ablation:
    jobs: list[Job]
    cells: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status not in DONE]


# ---------------------------------------------------------------------------------------------------------
# planning


def split_values(text: str) -> list[str]:
    """`a,b` -> [a, b]; commas inside [..], {..} or quotes stay (`[0.9,0.95],[0.9,0.99]` is two values)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`["model.norm=layernorm,rmsnorm", ...]` -> {"model.norm": ["layernorm", "rmsnorm"], ...}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        values = split_values(raw) if sep else []
        if not key or not values or any(not v for v in values):
            raise UserError(f"--grid {item!r}: write it as key=value1,value2 (e.g. --grid optim.lr=1e-3,3e-3)")
        if key in grid:
            raise UserError(f"--grid names {key} twice: give all its values in one --grid {key}=...")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r} repeats a value")
        grid[key] = values
    return grid


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: seeds are integers, e.g. --seeds 1,2,3") from None
    if not seeds:
        raise UserError("--seeds needs at least one integer, e.g. --seeds 1,2")
    return list(dict.fromkeys(seeds))


def cell_names(grid: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
    """(folder name, settings) per cell: `norm=rmsnorm__lr=0.003` (a key's last part unless two keys share it)."""
    if not grid:
        return [("base", {})]
    last = [key.rsplit(".", 1)[-1] for key in grid]
    short = {key: (part if last.count(part) == 1 else key) for key, part in zip(grid, last, strict=True)}
    cells = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values, strict=True))
        name = "__".join(f"{short[k]}={re.sub(r'[^A-Za-z0-9._+-]+', '_', v)}" for k, v in settings.items())
        cells.append((name, settings))
    names = [name for name, _ in cells]
    if len(set(names)) != len(names):
        raise UserError(
            "two grid cells get the same folder name (values that differ only in punctuation): "
            "write the values differently"
        )
    return cells


def plan(
    base: Base, grid: dict[str, list[str]], seeds: list[int] | None, max_steps: int | None, out_dir: str | Path
) -> list[Job]:
    """Every (cell, seed) job with its resolved, validated config; no file is touched."""
    from tokenmill.config import load_config

    if not base.presets and base.config_file is None:
        raise UserError("ablate needs a base config: BASE.yaml or --preset P (e.g. --preset tiny)")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps} must be at least 1")
    out = Path(out_dir).resolve()
    jobs = []
    for name, settings in cell_names(grid):
        for seed in seeds or [None]:
            overrides = [*base.overrides, *(f"{k}={v}" for k, v in settings.items())]
            if max_steps is not None:
                overrides.append(f"{RUN_KEYS['max_steps']}={max_steps}")
            if seed is not None:
                overrides.append(f"{RUN_KEYS['seed']}={seed}")
            else:  # the base's own seed names the folder
                seed = _dotted(load_config(list(base.presets), base.config_file, overrides).to_dict(), RUN_KEYS["seed"])
            folder = out / name / f"seed{seed}"
            overrides.append(f"{RUN_KEYS['out_dir']}={folder}")
            cfg = load_config(list(base.presets), base.config_file, overrides)
            jobs.append(Job(name, settings, seed, folder, overrides, cfg.to_dict(), cfg.data.tokenizer == "bpe"))
    return jobs


def _dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def check_folders(jobs: Sequence[Job]) -> None:
    """Refuse (before anything runs) a folder holding a run that is not this job's: nothing gets overwritten."""
    for job in jobs:
        record = job.folder / CELL_FILE
        if record.is_file():
            try:
                stored = json.loads(record.read_text(encoding="utf-8"))["config"]
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"{record} is damaged: move {job.folder} away or choose another --out-dir") from None
            changed = sorted(config_diff(stored, job.config), key=lambda diff: None in diff[1:])  # shared keys first
            if changed:
                key, old, new = changed[0]
                raise UserError(
                    f"{job.folder} holds a run with other settings ({key}: {old!r} -> {new!r}"
                    + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                    + "): choose another --out-dir"
                )
        elif job.folder.is_dir() and any(job.folder.iterdir()):
            raise UserError(
                f"{job.folder} holds files that no ablation made (no {CELL_FILE}): choose another --out-dir"
            )


def status_of(folder: Path) -> str:
    """The status its metrics.jsonl reports ("pending" when there is none yet)."""
    try:
        return summarize(load_run(folder))["status"]
    except UserError:
        return "pending"


# ---------------------------------------------------------------------------------------------------------
# running


def train_argv(base: Base, job: Job) -> list[str]:
    argv = [sys.executable, "-m", "tokenmill", "train"]
    if base.config_file is not None:
        argv.append(str(Path(base.config_file).resolve()))
    if base.presets:
        argv += ["--preset", ",".join(base.presets)]
    return [*argv, *(f"--{o}" for o in job.overrides), "--resume"]


def run_jobs(base: Base, jobs: Sequence[Job], parallel: int = 1, echo: Callable[[str], None] = print) -> None:
    """Run every unfinished job, `parallel` at a time; each job's status, time and message are filled in."""
    for job in jobs:
        job.status = status_of(job.folder) if (job.folder / CELL_FILE).is_file() else "pending"
    todo = [job for job in jobs if job.status not in DONE]
    skipped = len(jobs) - len(todo)
    if skipped:
        echo(f"skipping {skipped} finished run{'s' * (skipped > 1)} of {len(jobs)}")
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # N children must not each take every core
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    lock = threading.Lock()
    counter, total = itertools.count(1), len(todo)

    def work(job: Job) -> None:
        _share_tokenizers(job, jobs)
        _run_one(base, job, env)
        with lock:
            echo(
                f"[{next(counter)}/{total}] {job.cell} seed {job.seed}: {job.status} in {job.seconds:.0f}s"
                + (f" ({job.message})" if job.message else "")
            )

    # The first run trains the shared BPE tokenizer alone; the others then copy it instead of each training one.
    if parallel > 1 and todo and todo[0].uses_bpe and not _cached_tokenizers(jobs):
        work(todo.pop(0))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(work, todo))


def _run_one(base: Base, job: Job, env: dict[str, str]) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    _write_json(
        job.folder / CELL_FILE,
        {
            "cell": job.cell,
            "settings": job.settings,
            "seed": job.seed,
            "overrides": job.overrides,
            "config": job.config,
        },
    )
    argv = train_argv(base, job)
    started = time.perf_counter()
    with open(job.folder / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        job.exit_code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    job.seconds = time.perf_counter() - started
    job.status = status_of(job.folder)
    if job.status not in DONE:
        job.status = "failed" if job.status in ("pending", "incomplete") else job.status
        job.message = f"exit code {job.exit_code}: {_last_line(job.folder / LOG_FILE)} (see {job.folder / LOG_FILE})"


def _cached_tokenizers(jobs: Sequence[Job]) -> list[Path]:
    return [path.parent for job in jobs for path in (job.folder / TOKENIZER_CACHE).glob("*/tokenizer.json")]


def _share_tokenizers(job: Job, jobs: Sequence[Job]) -> None:
    """Copy tokenizers other runs trained into this run's cache; `train` uses one only if its settings match."""
    for folder in _cached_tokenizers(jobs):
        target = job.folder / TOKENIZER_CACHE / folder.name
        if not target.exists():
            shutil.copytree(folder, target)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


# ---------------------------------------------------------------------------------------------------------
# results


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single value) over seeds."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def collect(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One record per cell: its runs and the mean +- std of each aggregate over its completed runs."""
    cells: dict[str, dict[str, Any]] = {}
    for job in jobs:
        cell = cells.setdefault(job.cell, {"cell": job.cell, "settings": job.settings, "runs": []})
        summary = _summary_or_none(job.folder)
        run = {"seed": job.seed, "path": str(job.folder), "status": job.status}
        run.update({key: (summary or {}).get(key) for key in AGGREGATES})
        cell["runs"].append(run)
    for cell in cells.values():
        completed = [run for run in cell["runs"] if run["status"] == "completed"]
        for key in AGGREGATES:
            cell[key] = mean_std([run[key] for run in completed if run[key] is not None])
        counts: dict[str, int] = {}
        for run in cell["runs"]:
            counts[run["status"]] = counts.get(run["status"], 0) + 1
        cell["status"] = ", ".join(f"{n} {status}" for status, n in counts.items())
    return list(cells.values())


def _summary_or_none(folder: Path) -> dict[str, Any] | None:
    try:
        return summarize(load_run(folder))
    except UserError:
        return None


def _pm(stats: dict[str, Any], fmt: Callable[[float], str]) -> str:
    if stats["mean"] is None:
        return "-"
    return fmt(stats["mean"]) + ("" if stats["std"] is None else f" ± {fmt(stats['std'])}")


def results_markdown(cells: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    """The results table; the lowest mean eval loss is in bold."""
    means = [c["eval_loss"]["mean"] for c in cells if c["eval_loss"]["mean"] is not None]
    best = min(means) if means else None
    rows = []
    for cell in cells:
        loss = _pm(cell["eval_loss"], lambda v: f"{v:.4f}")
        if best is not None and cell["eval_loss"]["mean"] == best and len(cells) > 1:
            loss = f"**{loss}**"
        rows.append(
            (
                cell["cell"],
                [
                    *(cell["settings"][k] for k in grid_keys),
                    str(len(cell["runs"])),
                    loss,
                    _pm(cell["eval_bpb"], lambda v: f"{v:.4f}"),
                    _pm(cell["tokens_per_s"], human),
                    human(cell["params"]["mean"]),
                    cell["status"],
                ],
            )
        )
    header = ["cell", *grid_keys, "seeds", "eval loss", "eval bpb", "tokens/s", "params", "runs"]
    return markdown_table(header, rows)


def write_results(ablation: Ablation, out_dir: Path, grid: dict[str, list[str]], meta: dict[str, Any]) -> None:
    """ablation.json, ablation.md and (with matplotlib) ablation.png in `out_dir`, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / RESULT_FILES["json"], {**meta, "grid": grid, "cells": ablation.cells})
    _write_text(out_dir / RESULT_FILES["markdown"], results_markdown(ablation.cells, list(grid)) + "\n")
    ablation.files += [out_dir / RESULT_FILES["json"], out_dir / RESULT_FILES["markdown"]]
    runs = [(cell["cell"], _completed_runs(cell)) for cell in ablation.cells]
    if not any(found for _, found in runs):
        return
    try:
        from tokenmill.analysis.plot import build_ablation_figure, save_figure

        losses = [
            [run["eval_loss"] for run in cell["runs"] if run["status"] == "completed" and run["eval_loss"] is not None]
            for cell in ablation.cells
        ]
        save_figure(build_ablation_figure(runs, losses), out_dir / RESULT_FILES["plot"])
        ablation.files.append(out_dir / RESULT_FILES["plot"])
    except UserError as err:
        ablation.notes.append(f"plot skipped: {err}")


def _completed_runs(cell: dict[str, Any]) -> list[Run]:
    return [load_run(run["path"]) for run in cell["runs"] if run["status"] == "completed"]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def ablate(
    base: Base,
    grid: dict[str, list[str]],
    seeds: list[int] | None = None,
    max_steps: int | None = None,
    out_dir: str | Path = "runs/ablation",
    parallel: int = 1,
    echo: Callable[[str], None] = print,
) -> Ablation:
    """Plan, check, run what is unfinished, and write the results; see the module docstring."""
    if parallel < 1:
        raise UserError(f"--parallel {parallel} must be at least 1")
    jobs = plan(base, grid, seeds, max_steps, out_dir)
    check_folders(jobs)
    cells = len({job.cell for job in jobs})
    echo(
        f"ablation: {cells} cell{'s' * (cells > 1)} x {len(jobs) // cells} seed{'s' * (len(jobs) > cells)} "
        f"in {Path(out_dir).resolve()}"
    )
    run_jobs(base, jobs, parallel, echo)
    ablation = Ablation(jobs, collect(jobs))
    meta = {
        "base": {"presets": list(base.presets), "config_file": base.config_file, "overrides": list(base.overrides)},
        "seeds": seeds,
        "max_steps": max_steps,
    }
    write_results(ablation, Path(out_dir).resolve(), grid, meta)
    return ablation

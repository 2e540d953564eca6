"""Checkpoints (SPEC C1-C5): save, verify, load and retain full training state, and pick what to resume.

Layout of one checkpoint, `<out_dir>/checkpoints/step_00000100/`:
  model.safetensors  weights of the unwrapped model (no `module.`/`_orig_mod.`; tied tensors once)
  state.pt           optimizer, scheduler, data-loader, RNG states, train state, extra (weights_only-loadable)
  config.yaml        the resolved run config (rebuilds the model: tokenmill.load_model)
  meta.json          step, tokens seen, eval loss, versions, git commit, time
  manifest.json      size + sha256 of every file above; written last (see checkpoint_files.py)
`<out_dir>/checkpoints/best.json` points at the best checkpoint by eval loss.

Only rank 0 writes (the training loop adds a barrier after `save`); every rank may load.
Sharded (FSDP/PP) checkpoints through torch.distributed.checkpoint are not handled here.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from tokenmill.checkpoint.folder import (MANIFEST, TMP_PREFIX, atomic_write_json, staged_folder,
                                        verify_folder, write_file, write_json, write_manifest)
from tokenmill.checkpoint.resume import prepare_run_dir, resolve_resume
from tokenmill.checkpoint.state import (capture_rng, load_weights_into, restore_rng, retie, to_safe,
                                        weights_for_saving, write_safetensors)
from tokenmill.errors import UserError

__all__ = ["Checkpointer", "load_weights_into", "prepare_run_dir", "read_weights", "resolve_resume"]

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
BEST_POINTER = "best.json"
WEIGHTS, STATE, CONFIG, META = "model.safetensors", "state.pt", "config.yaml", "meta.json"
SHARDS_PREFIX = ".shards-"  # DCP shards of a sharded save before they join the staged folder
SHARDED_MARKER = ".metadata"  # DCP's metadata file: present only in sharded checkpoints
PER_RANK = "__per_rank__"  # marks a data-loader state saved as one dict per rank


class _Frozen:
    """A state_dict captured at save time (an async sharded save writes it later)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a `step_00000100` folder name, None for anything else (tmp folders, best.json)."""
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


@functools.cache
def _git_commit() -> str | None:
    """Commit of the tokenmill source tree, if it is a git checkout (cached: one subprocess per process)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, Any]:
    import tokenmill

    return {"tokenmill": tokenmill.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": _git_commit()}


def _config_text(config: Any) -> str | None:
    if config is None:
        return None
    if hasattr(config, "to_yaml"):
        return config.to_yaml()
    if isinstance(config, str):
        return config
    return yaml.safe_dump(config, sort_keys=False)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Checkpointer:
    """Owns `<run_dir>/checkpoints`: atomic saves, retention (last K + best k), verification, loading.

    `cfg` is the `checkpoint` config section (keep_last, keep_best); `config` is the resolved run config
    stored beside every checkpoint as config.yaml (a `cfg=` given to save() replaces it). `dist` (a
    parallel.dist.DistInfo) or `rank` says which process this is; call save/load on every rank.
    """

    def __init__(self, run_dir: str | Path, cfg: Any = None, *, config: Any = None, rank: int = 0,
                 dist: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.keep_last = max(1, getattr(cfg, "keep_last", 3))
        self.keep_best = max(0, getattr(cfg, "keep_best", 1))
        self.config_text = _config_text(config)
        self.dist = dist
        self.rank = dist.rank if dist is not None else rank
        self.distributed = bool(getattr(dist, "distributed", False))
        self.problems: list[str] = []  # why checkpoints were skipped by latest_valid / best
        self.last_path: Path | None = None
        self.last_save_s = 0.0
        self.last_save_bytes = 0
        self._verified: dict[Path, int] = {}  # folder -> manifest mtime_ns already checked deeply
        self.async_save = bool(getattr(cfg, "async_save", False))  # sharded runs only (DCP async_save)
        self._pending: tuple | None = None  # arguments of an async sharded save's final _write
        self._ckpt_group: Any = None

    # ------------------------------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, Any] | None = None, model: torch.nn.Module | None = None,
             optimizer: Any = None, scheduler: Any = None, loader: Any = None, extra: dict[str, Any] | None = None,
             *, engine: Any = None, cfg: Any = None, eval_loss: float | None = None, reason: str | None = None,
             train_state: dict[str, Any] | None = None, **named: Any) -> Path:
        """Write checkpoint `step` atomically, update best.json, apply retention; return its folder.

        Call on every rank: loader and RNG states are gathered per rank, rank 0 writes, and all ranks
        then agree on the outcome (a failed write raises the same UserError everywhere, no hang).
        `state`/`train_state` is the loop's counters (step, tokens_seen, best_eval_loss, ...); `loader`
        an object with state_dict() (or a state dict); `engine` (parallel.engine.Engine) supplies the
        model and the full optimizer state under ZeRO-1. Other keyword arguments (detector=..., scaler=...)
        and `extra` are stored as they are and come back by name from load(). Raises UserError on disk
        full / write errors, with earlier checkpoints intact.
        """
        final = self.dir / step_name(step)
        self.wait()  # an async sharded save still in flight is finalised first
        if engine is not None:
            model = model if model is not None else engine.model
        sharded = bool(getattr(engine, "sharded", False))
        optimizer_state = None
        if optimizer is not None and not sharded:  # a collective under ZeRO-1 (every rank must get here)
            optimizer_state = engine.optimizer_state_dict(optimizer) if engine is not None else optimizer.state_dict()
        loader_state = self._gather(self._loader_state(loader))
        rng_state = self._gather(capture_rng())
        shards = None
        if sharded:  # FSDP / pipeline: every rank writes its model + optimizer shards through DCP (parallel/dcp.py)
            shards = self._write_shards(final, model, optimizer)
            model, scheduler = None, _Frozen(scheduler.state_dict()) if scheduler is not None else None
            if shards.future is not None:  # async: finish (files, manifest, rename) at the next save or close()
                args = (final, step, {**(train_state or {}), **(state or {})}, model, optimizer_state, scheduler,
                        loader_state, rng_state, {**(extra or {}), **named}, cfg, eval_loss, reason, shards)
                self._pending = args
                self.last_path = final
                return final
        error, failure = None, None
        if self.rank == 0:
            try:
                self._write(final, step, {**(train_state or {}), **(state or {})}, model, optimizer_state, scheduler,
                            loader_state, rng_state, {**(extra or {}), **named}, cfg, eval_loss, reason, shards)
            except Exception as err:  # told to every rank below, then re-raised here
                failure = err
                error = str(err) if isinstance(err, UserError) else f"saving checkpoint {final} failed on rank 0: {err}"
        error = self._agree(error)
        if failure is not None:
            raise failure
        if error is not None:
            raise UserError(error)
        self.last_path = final
        return final

    def _write(self, final: Path, step: int, state: dict[str, Any], model: torch.nn.Module | None,
               optimizer_state: Any, scheduler: Any, loader_state: Any, rng_state: Any, extra: dict[str, Any],
               cfg: Any, eval_loss: float | None, reason: str | None, shards: Any = None) -> None:
        start = time.perf_counter()
        eval_loss = _finite_or_none(eval_loss)
        config_text = _config_text(cfg) if cfg is not None else self.config_text
        blob = {
            "format_version": 1,
            "step": step,
            "train_state": to_safe(state, "train_state"),
            "optimizer": to_safe(optimizer_state, "optimizer"),
            "scheduler": to_safe(scheduler.state_dict(), "scheduler") if scheduler is not None else None,
            "loader": to_safe(loader_state, "loader"),
            "rng": rng_state,
            "extra": to_safe(extra, "extra"),
            "eval_loss": eval_loss,
        }
        meta = {"step": step, "tokens_seen": state.get("tokens_seen"), "eval_loss": eval_loss, "reason": reason,
                "sharded": shards is not None,
                "world_size": getattr(self.dist, "world_size", 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "unix_time": time.time(), **_versions()}
        self._remove_stale_tmp()
        with staged_folder(final) as tmp:
            written = {}  # name -> {bytes, sha256}, hashed while writing
            if shards is not None:  # DCP shards + .metadata of every rank (hashed by write_manifest)
                shards.move_into(tmp)
            if model is not None:
                written[WEIGHTS] = self._write_weights(tmp / WEIGHTS, model)
            written[STATE] = write_file(tmp / STATE, lambda handle: torch.save(blob, handle))
            if config_text is not None:
                written[CONFIG] = write_file(tmp / CONFIG, lambda handle: handle.write(config_text.encode()))
            written[META] = write_json(tmp / META, meta)
            write_manifest(tmp, step, written)  # last: its presence marks the folder complete
        self._verified[final] = (final / MANIFEST).stat().st_mtime_ns
        self.last_save_bytes = sum(p.stat().st_size for p in final.iterdir())
        if eval_loss is not None and self.is_best(eval_loss, exclude=final):
            atomic_write_json(self.dir / BEST_POINTER, {"name": final.name, "step": step, "eval_loss": eval_loss})
        self._retain(final)
        self.last_save_s = time.perf_counter() - start

    def _gather(self, value: Any) -> Any:
        """Per-rank values as {PER_RANK: [rank 0, rank 1, ...]} in a distributed run; the value itself otherwise."""
        if not self.distributed:
            return value
        import torch.distributed as tdist

        values: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(values, value)
        return {PER_RANK: values}

    def _agree(self, error: str | None) -> str | None:
        """Rank 0's outcome on every rank (so a failed save stops all ranks instead of hanging them)."""
        if not self.distributed:
            return error
        import torch.distributed as tdist

        box = [error]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def _loader_state(loader: Any) -> Any:
        if loader is None or isinstance(loader, dict):
            return loader
        return loader.state_dict()

    @staticmethod
    def _write_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
        tensors, tied = weights_for_saving(model)
        # safetensors metadata is str -> str; the tied map travels as JSON.
        metadata = {"format": "pt", "tied": json.dumps(tied)}
        return write_file(path, lambda handle: write_safetensors(handle, tensors, metadata))

    def _remove_stale_tmp(self) -> None:
        if self.dir.is_dir():
            for path in self.dir.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _write_shards(self, final: Path, model: torch.nn.Module, optimizer: Any) -> Any:
        from tokenmill.checkpoint.sharded import write_shards

        async_save = bool(getattr(self, "async_save", False)) and self.distributed
        if async_save and self._ckpt_group is None:
            import torch.distributed as tdist

            self._ckpt_group = tdist.new_group(backend="gloo")  # background writes never share training's group
        return write_shards(self.dir / f"{SHARDS_PREFIX}{final.name}", model, optimizer, async_save=async_save,
                            process_group=self._ckpt_group)

    def wait(self) -> None:
        """Finish an async sharded save (small files, manifest, rename) on every rank; no-op when none."""
        args, self._pending = getattr(self, "_pending", None), None
        if args is None:
            return
        shards = args[-1]
        shards.wait()  # this rank's shards are on disk
        error, failure = None, None
        if self.rank == 0:
            try:
                self._write(*args)
            except Exception as err:
                failure = err
                error = str(err) if isinstance(err, UserError) else f"saving checkpoint {args[0]} failed on rank 0: {err}"
        error = self._agree(error)
        if failure is not None:
            raise failure
        if error is not None:
            raise UserError(error)

    def close(self) -> None:
        """Wait for an async sharded save in flight (call before exit)."""
        self.wait()

    # ------------------------------------------------------------------------------------- find
    def list_checkpoints(self) -> list[Path]:
        """Every `step_*` folder (valid or not), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(parse_step(p.name), p) for p in self.dir.iterdir() if p.is_dir()]
        return [p for step, p in sorted((s, p) for s, p in found if s is not None)]

    def verify(self, path: str | Path) -> Path:
        """Raise a one-line UserError if `path` is partial or damaged; checksums each folder once."""
        path = Path(path)
        manifest_file = path / MANIFEST
        mtime = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
        if mtime is None or self._verified.get(path) != mtime:
            verify_folder(path, deep=True)
            self._verified[path] = mtime
        return path

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that passes verification; damaged ones are skipped (reasons in .problems)."""
        for path in reversed(self.list_checkpoints()):
            try:
                return self.verify(path)
            except UserError as err:
                self.problems.append(str(err))
                warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
        return None

    def _meta(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / META).read_text())
        except (OSError, ValueError):
            return {}

    def _scored(self) -> list[tuple[float, Path]]:
        """(eval loss, folder) of complete checkpoints saved with an eval loss, best first."""
        scored = []
        for path in self.list_checkpoints():
            loss = _finite_or_none(self._meta(path).get("eval_loss")) if (path / MANIFEST).is_file() else None
            if loss is not None:
                scored.append((loss, path))
        return sorted(scored, key=lambda item: (item[0], -parse_step(item[1].name)))

    def best(self) -> Path | None:
        """The valid checkpoint with the lowest eval loss (best.json, else a scan of meta.json files)."""
        candidates = [path for path in [self._best_pointer()] if path is not None]
        candidates += [path for _, path in self._scored()]
        for path in candidates:
            try:
                return self.verify(path)
            except UserError as err:
                self.problems.append(str(err))
        return None

    def _best_pointer(self) -> Path | None:
        try:
            return self.dir / json.loads((self.dir / BEST_POINTER).read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_best(self, eval_loss: float, exclude: Path | None = None) -> bool:
        """True if `eval_loss` beats every checkpoint saved so far (call before save to decide on a best save)."""
        scored = [loss for loss, path in self._scored() if path != exclude]
        return not scored or eval_loss < scored[0]

    # ------------------------------------------------------------------------------------- retain
    def _retain(self, just_written: Path) -> None:
        """Delete complete checkpoints outside last keep_last and best keep_best; never the new or best one."""
        complete = [p for p in self.list_checkpoints() if (p / MANIFEST).is_file()]
        keep = set(complete[-self.keep_last:]) | {just_written, self._best_pointer()}
        keep |= {path for _, path in self._scored()[: self.keep_best]}
        for path in complete:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                self._verified.pop(path, None)

    # ------------------------------------------------------------------------------------- load
    def load(self, path: str | Path, model: torch.nn.Module | None = None, optimizer: Any = None,
             scheduler: Any = None, loader: Any = None, *, engine: Any = None, cfg: Any = None,
             restore_rng_state: bool = True) -> dict[str, Any]:
        """Verify `path`, load what is given in place and restore this rank's RNG states.

        `cfg` (the current run config) lets a model mismatch name the changed model.* settings.
        Returns {"path", "step", "train_state", "extra", "eval_loss", "meta", "loader_state"} plus every
        named value given to save() (e.g. "detector", "scaler").
        """
        path = self.verify(path)
        if engine is not None and model is None:
            model = engine.model
        if (path / SHARDED_MARKER).is_file():  # written by a sharded run: any layout reads its own slices
            from tokenmill.checkpoint.sharded import load_sharded

            if model is not None:
                load_sharded(path, model, optimizer)
            model, optimizer = None, None
        elif getattr(engine, "sharded", False) and model is not None:  # a single-file checkpoint into shards/stages
            from tokenmill.checkpoint.sharded import load_full_state

            blob = torch.load(path / STATE, map_location="cpu", weights_only=True)
            load_full_state(model, optimizer, read_weights(path), blob.get("optimizer") if optimizer else None)
            model, optimizer = None, None
        if model is not None:
            try:
                load_weights_into(model, read_weights(path), str(path))
            except UserError as err:
                raise UserError(f"{err}{self._config_diff(path, cfg)}") from None
        blob = torch.load(path / STATE, map_location="cpu", weights_only=True)
        if optimizer is not None:
            if blob.get("optimizer") is None:
                raise UserError(f"checkpoint {path} holds no optimizer state; start a new run or load weights only")
            try:
                optimizer.load_state_dict(blob["optimizer"])
            except (ValueError, KeyError) as err:
                raise UserError(f"optimizer state in {path / STATE} does not fit this optimizer ({err}); resume with "
                                f"the same optim.* settings") from err
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        loader_state = self._for_rank(blob.get("loader"), path, "data-loader")
        if loader is not None and loader_state is not None:
            loader.load_state_dict(loader_state)
        if restore_rng_state:
            restore_rng(self._for_rank(blob["rng"], path, "RNG"))
        extra = blob.get("extra") or {}
        return {**extra, "path": path, "step": blob["step"], "train_state": blob.get("train_state") or {},
                "extra": extra, "eval_loss": blob.get("eval_loss"), "meta": self._meta(path),
                "loader_state": loader_state}

    def _config_diff(self, path: Path, cfg: Any) -> str:
        """' (changed: model.d_model 256 -> 512, ...)' between the saved config.yaml and `cfg`."""
        if cfg is None or not (path / CONFIG).is_file():
            return ""
        saved = (yaml.safe_load((path / CONFIG).read_text()) or {}).get("model", {})
        now = cfg.to_dict()["model"] if hasattr(cfg, "to_dict") else dict(cfg.get("model", {}))
        changed = [f"model.{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k)]
        return f" (changed: {', '.join(changed)})" if changed else ""

    def _for_rank(self, saved: Any, path: Path, what: str) -> Any:
        if not (isinstance(saved, dict) and PER_RANK in saved):
            return saved
        states = saved[PER_RANK]
        if self.rank >= len(states):
            raise UserError(f"checkpoint {path} holds {what} states for {len(states)} ranks but this is rank "
                            f"{self.rank}: resume with the same number of processes")
        return states[self.rank]


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder `path` on the CPU, with tied duplicates filled back in."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise UserError(f"checkpoint {path} holds no {WEIGHTS}")
    with safe_open(str(file), framework="pt") as handle:
        tied = json.loads((handle.metadata() or {}).get("tied", "{}"))
    return retie(load_file(str(file), device="cpu"), tied)

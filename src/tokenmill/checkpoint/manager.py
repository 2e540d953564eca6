"""Checkpointer: save, verify, load and retain the full training state of a run, as a dict of Stateful parts.

    checkpointer = Checkpointer(run_dir, cfg.checkpoint, {"model": ModelState(model), "optimizer": opt,
                                "scheduler": scheduler, "loader": loader, "train": train_state}, run_config=cfg)
    checkpointer.save(step, eval_loss=..., reason="interval")   # every rank
    checkpointer.load(path)                                      # every rank: each part restored in place

Layout of one checkpoint, `<out_dir>/checkpoints/step_00000100/`:
  model.safetensors  weights of the plain model (no `module.`/`_orig_mod.`; tied tensors once), or, for a
  .metadata, *.distcp   sharded run (FSDP, pipeline), model + optimizer shards of every rank (checkpoint/sharded.py)
  state.pt           every other part, RNG states, step (weights_only-loadable; checkpoint/values.py)
  config.yaml        the resolved run config (rebuilds the model: tokenmill.load_model)
  tokenizer.json     the run's tokenizer, so the folder alone is enough to generate, export or serve
  chat_template.jinja  the chat template of a fine-tuning run (data.format=prompt_completion), for serve/export
  meta.json          step, tokens seen, eval loss, sharded or not, versions, git commit, time
  manifest.json      size + sha256 of every file above; written last (checkpoint/folder.py)
`<out_dir>/checkpoints/best.json` points at the best checkpoint by eval loss.

Call save and load on every rank: per-rank parts (the data loader) and RNG states are gathered, rank 0
writes, and every rank then learns the outcome, so a failed save raises the same error everywhere instead
of hanging the job. A sharded save with `checkpoint.async_save` returns once the shards are staged in
host memory; the next save, `wait()` or `close()` finishes it.
"""

from __future__ import annotations

import copy
import functools
import platform
import subprocess
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tokenmill.checkpoint.config import CheckpointConfig
from tokenmill.checkpoint.find import (
    BEST_POINTER,
    CHECKPOINTS,
    STEP_PREFIX,
    best_pointer,
    finite_or_none,
    list_checkpoints,
    parse_step,
    read_meta,
    scored,
    step_name,
)
from tokenmill.checkpoint.folder import (
    CHAT_TEMPLATE,
    CONFIG,
    DELETE_PREFIX,
    MANIFEST,
    META,
    OLD_PREFIX,
    SHARDS_PREFIX,
    STATE,
    TMP_PREFIX,
    TOKENIZER,
    WEIGHTS,
    atomic_write_json,
    clean_interrupted,
    delete_folder,
    is_sharded,
    read_manifest,
    staged_folder,
    verify_folder,
    write_bytes,
    write_file,
    write_json,
    write_manifest,
)
from tokenmill.checkpoint.parts import MODEL, OPTIMIZER, ModelState, OptimizerState, Stateful, as_part
from tokenmill.checkpoint.values import capture_rng, load_values, restore_rng, to_safe
from tokenmill.checkpoint.weights import read_weights, write_weights
from tokenmill.errors import UserError

__all__ = ["OUTPUTS", "Checkpointer", "PendingSave"]

# What a run's checkpointing writes under its out_dir (train/run_dir.py removes exactly these on --overwrite)
OUTPUTS = tuple(
    f"{CHECKPOINTS}/{pattern}"
    for pattern in (
        f"{STEP_PREFIX}*",
        BEST_POINTER,
        f"{TMP_PREFIX}*",
        f"{OLD_PREFIX}*",
        f"{DELETE_PREFIX}*",
        f"{SHARDS_PREFIX}*",
    )
)
FORMAT_VERSION = 2  # of state.pt: {"format_version", "step", "eval_loss", "rng", "parts": {name: state}}
PER_RANK = "__per_rank__"  # marks a value saved as one entry per rank
PER_RANK_PARTS = ("loader",)  # parts whose state differs between ranks (each rank reads its own data)
TRAIN = "train"  # the loop's counters; meta.json copies its tokens_seen


@functools.cache
def _git_commit() -> str | None:
    """Commit of the tokenmill source tree, if it is a git checkout (cached: one subprocess per process)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, Any]:
    import tokenmill

    return {
        "tokenmill": tokenmill.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }


def _config_text(config: Any) -> str | None:
    if config is None:
        return None
    if hasattr(config, "to_yaml"):
        return config.to_yaml()
    if isinstance(config, str):
        return config
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class PendingSave:
    """One checkpoint between capture (every rank, at the step) and publication (rank 0)."""

    final: Path
    step: int
    eval_loss: float | None
    values: dict[str, Any]  # the content of state.pt
    meta: dict[str, Any]
    model: ModelState | None  # written as safetensors by rank 0; None for a sharded save
    shards: Any = None  # sharded.ShardWrite: DCP shards of every rank, possibly still being written


class Checkpointer:
    """Owns `<run_dir>/checkpoints`: atomic saves of `parts`, retention (last K + best k), verification, loading.

    `cfg` is the `checkpoint` config section. `run_config` (the resolved run config) is stored beside every
    checkpoint as config.yaml and names changed model settings when weights do not fit; `tokenizer_json`
    (the text of the run's tokenizer.json) is stored as tokenizer.json, and `chat_template` (a Jinja chat
    template) as chat_template.jinja. `dist` says which process this is.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig | None = None,
        parts: Mapping[str, Any] | None = None,
        *,
        run_config: Any = None,
        tokenizer_json: str | None = None,
        chat_template: str | None = None,
        dist: Any = None,
        per_rank: Collection[str] = PER_RANK_PARTS,
    ) -> None:
        cfg = cfg if cfg is not None else CheckpointConfig()
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.keep_last = max(1, cfg.keep_last)
        self.keep_best = max(0, cfg.keep_best)
        self.parts: dict[str, Stateful] = {name: as_part(name, part) for name, part in (parts or {}).items()}
        self.per_rank = frozenset(per_rank)
        self.run_config = run_config
        self.config_text = _config_text(run_config)
        self.tokenizer_json = tokenizer_json
        self.chat_template = chat_template
        self.rank = dist.rank if dist is not None else 0
        self.world_size = dist.world_size if dist is not None else 1
        self.distributed = dist is not None and dist.distributed
        self.async_save = cfg.async_save and self.distributed  # DCP async_save: sharded runs only
        self.last_path: Path | None = None
        self.last_save_s = 0.0
        self.last_save_bytes = 0
        self._verified: dict[Path, int] = {}  # folder -> manifest mtime_ns already checked deeply
        self._pending: PendingSave | None = None  # an async sharded save to finish
        self._ckpt_group: Any = None

    @property
    def sharded(self) -> bool:
        model = self.parts.get(MODEL)
        return isinstance(model, ModelState) and model.sharded

    # ------------------------------------------------------------------------------------- save
    def save(self, step: int, eval_loss: float | None = None, reason: str | None = None) -> Path:
        """Write checkpoint `step` of every part atomically, update best.json, apply retention; return its folder.

        Raises UserError on disk full / write errors (on every rank), with earlier checkpoints intact.
        """
        self.wait()  # an async save still in flight is published first
        if self.rank == 0:
            clean_interrupted(self.dir)
        pending = self._capture(step, finite_or_none(eval_loss), reason)
        if pending.shards is not None and pending.shards.future is not None:
            pending.values = copy.deepcopy(pending.values)  # training goes on: freeze the small state now
            self._pending = pending
        else:
            self._publish(pending)
        self.last_path = pending.final
        return pending.final

    def _capture(self, step: int, eval_loss: float | None, reason: str | None) -> PendingSave:
        """Every rank: take each part's state now (collectives included); sharded runs start writing shards."""
        final = self.dir / step_name(step)
        sharded = self.sharded
        states = {}
        for name, part in self.parts.items():
            if name == MODEL or (sharded and name == OPTIMIZER):
                continue
            state = part.state_dict()  # the optimizer's is a collective under ZeRO-1: every rank gets here
            states[name] = self._gather(state) if name in self.per_rank else state
        values = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "eval_loss": eval_loss,
            "rng": self._gather(capture_rng()),
            "parts": to_safe(states, "parts"),
        }
        train = states.get(TRAIN)
        meta = {
            "step": step,
            "tokens_seen": train.get("tokens_seen") if isinstance(train, Mapping) else None,
            "eval_loss": eval_loss,
            "reason": reason,
            "sharded": sharded,
            "parts": sorted(self.parts),
            "world_size": self.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "unix_time": time.time(),
            **_versions(),
        }
        model = self.parts.get(MODEL)
        shards = self._write_shards(final) if sharded else None
        return PendingSave(final, step, eval_loss, values, meta, None if sharded else model, shards)

    def _write_shards(self, final: Path) -> Any:
        from tokenmill.checkpoint.sharded import write_shards

        if self.async_save and self._ckpt_group is None:
            import torch.distributed as tdist

            self._ckpt_group = tdist.new_group(backend="gloo")  # background writes never share training's group
        optimizer = self.parts.get(OPTIMIZER)
        return write_shards(
            self.dir / f"{SHARDS_PREFIX}{final.name}",
            self.parts[MODEL].model,
            optimizer.optimizer if isinstance(optimizer, OptimizerState) else None,
            async_save=self.async_save,
            process_group=self._ckpt_group,
        )

    def _publish(self, pending: PendingSave) -> None:
        """Every rank: wait for this rank's shards; rank 0 writes the folder; all agree on the outcome."""
        if pending.shards is not None:
            pending.shards.wait()
        self._rank0_then_agree(lambda: self._write(pending), f"saving checkpoint {pending.final}")

    def _rank0_then_agree(self, write: Callable[[], None], what: str) -> None:
        """Run `write` on rank 0 only, then raise its error (as a one-line UserError) on every rank."""
        error, failure = None, None
        if self.rank == 0:
            try:
                write()
            except Exception as err:  # told to every rank below, then re-raised here
                failure = err
                error = str(err) if isinstance(err, UserError) else f"{what} failed on rank 0: {err}"
        error = self._agree(error)
        if failure is not None:
            raise failure
        if error is not None:
            raise UserError(error)

    def _write(self, pending: PendingSave) -> None:
        """Rank 0: the staged folder, manifest last, atomic rename; then best.json and retention."""
        start = time.perf_counter()
        final = pending.final
        with staged_folder(final) as tmp:
            written = {}  # name -> {bytes, sha256}, hashed while writing
            if pending.shards is not None:  # DCP shards + .metadata of every rank (hashed by write_manifest)
                pending.shards.move_into(tmp)
            if pending.model is not None:
                weights = pending.model.state_dict()
                written[WEIGHTS] = write_file(tmp / WEIGHTS, lambda handle: write_weights(handle, weights))
            written[STATE] = write_file(tmp / STATE, lambda handle: torch.save(pending.values, handle))
            if self.config_text is not None:
                written[CONFIG] = write_bytes(tmp / CONFIG, self.config_text.encode())
            if self.tokenizer_json is not None:
                written[TOKENIZER] = write_bytes(tmp / TOKENIZER, self.tokenizer_json.encode())
            if self.chat_template is not None:
                written[CHAT_TEMPLATE] = write_bytes(tmp / CHAT_TEMPLATE, self.chat_template.encode())
            written[META] = write_json(tmp / META, pending.meta)
            write_manifest(tmp, pending.step, written)  # last: its presence marks the folder complete
        self._verified[final] = (final / MANIFEST).stat().st_mtime_ns
        self.last_save_bytes = sum(p.stat().st_size for p in final.iterdir())
        if pending.eval_loss is not None and self.is_best(pending.eval_loss, exclude=final):
            atomic_write_json(
                self.dir / BEST_POINTER, {"name": final.name, "step": pending.step, "eval_loss": pending.eval_loss}
            )
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

    def wait(self) -> None:
        """Publish an async sharded save (small files, manifest, rename) on every rank; no-op when none."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._publish(pending)

    def close(self) -> None:
        """Wait for an async sharded save in flight (call before exit)."""
        self.wait()

    # ------------------------------------------------------------------------------------- retain
    def list_checkpoints(self) -> list[Path]:
        """Every `step_*` folder (valid or not), oldest first."""
        return list_checkpoints(self.dir)

    def is_best(self, eval_loss: float, exclude: Path | None = None) -> bool:
        """True if `eval_loss` beats every checkpoint saved so far (call before save to decide on a best save)."""
        losses = [loss for loss, path in scored(self.dir) if path != exclude]
        return not losses or eval_loss < losses[0]

    def _retain(self, just_written: Path) -> None:
        """Delete complete checkpoints outside the last keep_last and best keep_best (never the new or the best
        one), and folders without a manifest older than the new one: a save never leaves those, only a
        deletion killed by an older tokenmill, and they are never chosen."""
        found = self.list_checkpoints()
        complete = [p for p in found if (p / MANIFEST).is_file()]
        keep = set(complete[-self.keep_last :]) | {just_written, best_pointer(self.dir)}
        keep |= {path for _, path in scored(self.dir)[: self.keep_best]}
        newest = parse_step(just_written.name)
        for path in found:
            if path not in keep and (path in complete or (parse_step(path.name) or 0) < newest):
                delete_folder(path)
                self._verified.pop(path, None)

    # ------------------------------------------------------------------------------------- load
    def verify(self, path: str | Path) -> Path:
        """Raise a one-line UserError if `path` is partial or damaged; checksums each folder once."""
        path = Path(path)
        manifest_file = path / MANIFEST
        mtime = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
        if mtime is None or self._verified.get(path) != mtime:
            verify_folder(path, deep=True)
            self._verified[path] = mtime
        return path

    def load(self, path: str | Path, restore_rng_state: bool = True) -> dict[str, Any]:
        """Verify `path`, restore every part in place and this rank's RNG states.

        Returns {"path", "step", "eval_loss", "meta"}. A part the checkpoint does not hold (or holds empty,
        like a disabled grad scaler) keeps its current state; the optimizer's is required.
        """
        path = self.verify(path)
        sharded_checkpoint = is_sharded(path, read_manifest(path))
        if not (path / STATE).is_file():
            raise UserError(
                f"checkpoint {path} holds weights only (no {STATE}), so training cannot resume from it; "
                f"load it with tokenmill.load_model or start a new run"
            )
        values = load_values(path / STATE)
        saved = _saved_parts(values, path)
        weights_done = self._load_model_and_optimizer(path, sharded_checkpoint, saved)
        for name, part in self.parts.items():
            if name in weights_done:
                continue
            state = saved.get(name)
            if name in self.per_rank:
                state = self._for_rank(state, path, name)
            if state is None and name == OPTIMIZER:
                raise UserError(f"checkpoint {path} holds no optimizer state; start a new run or load weights only")
            if state is None or (isinstance(state, Mapping) and not state):
                continue
            try:
                part.load_state_dict(state)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
                raise UserError(
                    f"the {name} state in {path / STATE} does not fit this run ({str(err)[:200]}); "
                    f"resume with the same settings"
                ) from None
        if restore_rng_state:
            restore_rng(self._for_rank(values.get("rng"), path, "RNG"))
        return {"path": path, "step": values["step"], "eval_loss": values.get("eval_loss"), "meta": read_meta(path)}

    def _load_model_and_optimizer(self, path: Path, sharded_checkpoint: bool, saved: dict[str, Any]) -> set[str]:
        """Restore the model (and, where they travel together, the optimizer); return the parts done."""
        model = self.parts.get(MODEL)
        if not isinstance(model, ModelState):
            return set()
        optimizer = self.parts.get(OPTIMIZER)
        live_optimizer = optimizer.optimizer if isinstance(optimizer, OptimizerState) else None
        if sharded_checkpoint:  # any layout reads its own slices of the shards
            from tokenmill.checkpoint.sharded import load_sharded

            load_sharded(path, model.model, live_optimizer)
            return {MODEL, OPTIMIZER}
        weights = read_weights(path)
        if not model.sharded:
            try:
                model.load_state_dict(weights)
            except UserError as err:
                raise UserError(f"checkpoint {path}: {err}{self._config_diff(path)}") from None
            return {MODEL}
        from tokenmill.checkpoint.sharded import load_full_state  # a single-file checkpoint into shards / stages

        optimizer_state = saved.get(OPTIMIZER) if live_optimizer is not None else None
        if live_optimizer is not None and optimizer_state is None:
            raise UserError(f"checkpoint {path} holds no optimizer state; start a new run or load weights only")
        load_full_state(model.model, live_optimizer, weights, optimizer_state)
        return {MODEL, OPTIMIZER}

    def _config_diff(self, path: Path) -> str:
        """' (changed: model.d_model 256 -> 512, ...)' between the saved config.yaml and the run config."""
        if self.run_config is None or not (path / CONFIG).is_file():
            return ""
        try:
            saved = (yaml.safe_load((path / CONFIG).read_text()) or {}).get("model", {})
        except (yaml.YAMLError, AttributeError):
            return ""
        config = self.run_config
        now = config.to_dict()["model"] if hasattr(config, "to_dict") else dict(config.get("model", {}))
        changed = [
            f"model.{k} {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
        return f" (changed: {', '.join(changed)})" if changed else ""

    def _for_rank(self, saved: Any, path: Path, what: str) -> Any:
        if not (isinstance(saved, dict) and PER_RANK in saved):
            return saved
        states = saved[PER_RANK]
        if not isinstance(states, list) or self.rank >= len(states):
            count = len(states) if isinstance(states, list) else 0
            raise UserError(
                f"checkpoint {path} holds {what} states for {count} ranks but this is rank "
                f"{self.rank}: resume with the same number of processes"
            )
        return states[self.rank]


def _saved_parts(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """{part name: state} of a state.pt; format 1 (before parts had names) is mapped onto today's names."""
    version = values.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} was written by a newer tokenmill (state format {version}); upgrade tokenmill to load it"
        )
    if version == 1:
        saved = {
            TRAIN: values.get("train_state"),
            OPTIMIZER: values.get("optimizer"),
            "scheduler": values.get("scheduler"),
            "loader": values.get("loader"),
            **(values.get("extra") or {}),
        }
    else:
        saved = values.get("parts")
    if (
        not isinstance(saved, dict)
        or not isinstance(values.get("step"), int)
        or not isinstance(values.get("rng"), dict)
    ):
        raise UserError(f"checkpoint file {path / STATE} is not a tokenmill state file; use an earlier checkpoint")
    return saved


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Weights of a verified single-file checkpoint folder into `model`; a sharded one names the command that
    makes it single-file."""
    if is_sharded(folder, read_manifest(folder)):
        raise UserError(
            f"checkpoint {folder} is sharded (saved by an FSDP or pipeline run): run `tokenmill "
            f"checkpoint consolidate {folder} OUT_DIR` once and load OUT_DIR"
        )
    try:
        ModelState(model).load_state_dict(read_weights(folder))
    except UserError as err:
        raise UserError(f"checkpoint {folder}: {err}") from None

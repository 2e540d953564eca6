"""`train(cfg)`: the whole training run, top to bottom, with a comment per section.

Set up (process group, tokenizer, model, optimizer, schedule, loaders, sinks) -> resume -> loop (accumulate,
check, clip, step, schedule, log, eval, checkpoint) -> tear down. Helpers own their state (loader, checkpointer,
monitor, detector); everything that decides the next batch or update is in the checkpoint, so a resumed run
continues bit for bit on CPU. Evaluation and samples only observe: when they fail the run warns and goes on,
so they never cost it a checkpoint.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.parts import ModelState, OptimizerState
from tokenmill.checkpoint.values import capture_rng, restore_rng
from tokenmill.config import Config
from tokenmill.data.formats import chat_template_text
from tokenmill.data.loader import build_loader
from tokenmill.data.quality import loader_problem_lines
from tokenmill.data.tokenizer import Tokenizer, build_tokenizer, check_vocab
from tokenmill.errors import UserError
from tokenmill.jobs.actions import Action
from tokenmill.jobs.control import JobControl
from tokenmill.jobs.status import StatusSink
from tokenmill.levers import fp8
from tokenmill.levers.fused_loss import check_loss_impl
from tokenmill.metrics.banner import build_banner
from tokenmill.metrics.monitor import StepMonitor
from tokenmill.metrics.sinks import build_sinks, get_console
from tokenmill.model import build_meta, param_counts
from tokenmill.optim.optimizers import build_optimizer, scaled_lr
from tokenmill.optim.schedules import build_scheduler
from tokenmill.parallel.dist import (
    DistInfo,
    all_reduce,
    any_rank,
    barrier,
    destroy_distributed,
    init_distributed,
    max_over_ranks,
    torchrun_restarts_workers,
)
from tokenmill.parallel.engine import build_engine
from tokenmill.train.batching import BatchPlan, plan_batches
from tokenmill.train.cadence import build_cadence
from tokenmill.train.evaluation import check_eval_split, run_eval, write_samples
from tokenmill.train.precision import Precision, resolve_precision
from tokenmill.train.run_dir import prepare_run_dir
from tokenmill.train.sft import resolve_sft_config
from tokenmill.train.stability import DivergenceDetector
from tokenmill.train.state import TrainState

EXIT_OK, EXIT_DIVERGED, EXIT_NONFINITE, EXIT_ABORTED = 0, 3, 4, 5
# Why an aborted run exits 0 under torchrun --max-restarts: any non-zero exit relaunches the workers, and with
# --resume the relaunch would carry on the run the user aborted. Its status (summary, status.json) still says so.
ABORT_UNDER_RESTARTS = "aborted with exit code 0, not 5: torchrun --max-restarts would relaunch the run on a failure"


def abort_exit_code() -> int:
    """EXIT_ABORTED, or EXIT_OK where a failure exit would make torchrun restart the workers (see above)."""
    return EXIT_OK if torchrun_restarts_workers() else EXIT_ABORTED


@dataclass
class TrainResult:
    status: (
        str  # completed | stopped | aborted | diverged | nonfinite (failed / interrupted only reach the summary event)
    )
    exit_code: int
    state: TrainState
    losses: list[float] = field(default_factory=list)  # this process's step losses, in order
    last_eval: dict[str, float] = field(default_factory=dict)
    run_dir: Path = Path(".")


def resolve_model_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """`model.vocab_size: 0` takes the tokenizer's vocab rounded up to `vocab_multiple_of`; else check it fits."""
    if cfg.model.vocab_size == 0:
        m = cfg.model.vocab_multiple_of
        vocab = -(-tokenizer.vocab_size // m) * m
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    check_vocab(cfg.model.vocab_size, tokenizer)
    return cfg


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, resume: str | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) training as `cfg` says; returns how it ended. Joins/leaves the torchrun process group."""
    dist = init_distributed(cfg.parallel, cfg.train.device)
    try:
        return _train(cfg, dist, resume, overwrite)
    except torch.OutOfMemoryError as err:
        raise UserError(
            f"out of GPU memory with micro_batch_size={cfg.train.micro_batch_size}, seq_len={cfg.train.seq_len}, "
            f"activation_checkpointing={cfg.train.activation_checkpointing}: lower train.micro_batch_size (raise "
            f"train.global_batch_tokens accumulation instead), set train.activation_checkpointing=all, set "
            f"train.loss_chunk_size=4096, or lower train.seq_len; `tokenmill estimate --gpu NAME` shows what fits"
        ) from err
    except (MemoryError, RuntimeError) as err:
        if not is_cpu_out_of_memory(err):
            raise
        raise UserError(
            f"out of CPU memory with micro_batch_size={cfg.train.micro_batch_size}, seq_len={cfg.train.seq_len} "
            f"(model.max_seq_len={cfg.model.max_seq_len}): lower train.micro_batch_size or train.seq_len (and "
            f"model.max_seq_len, which sizes the position tables), or set train.activation_checkpointing=all"
        ) from err
    finally:
        destroy_distributed()


def is_cpu_out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, or PyTorch's CPU allocator refusing an allocation (a RuntimeError)."""
    return isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate" in str(err)


def _train(cfg: Config, dist: DistInfo, resume: str | bool | None, overwrite: bool) -> TrainResult:
    # ---- set up -------------------------------------------------------------------------------------------
    started_at = time.time()  # job-control requests older than this were meant for an earlier process
    cfg = resolve_sft_config(cfg)  # data.format=prompt_completion: document masking, the fine-tuned tokenizer
    run_dir = Path(cfg.train.out_dir)
    # batch arithmetic that does not divide fails here, before any file is touched or a tokenizer trained
    plan_batches(
        cfg.train.micro_batch_size,
        cfg.train.seq_len,
        max(1, dist.world_size // cfg.parallel.pp),
        cfg.train.global_batch_tokens,
        cfg.train.total_tokens,
        cfg.train.max_steps,
        n_params=1,
        grad_accum=cfg.train.grad_accum,
    )
    fp8.check_fp8(cfg.train.fp8, dist.device)  # levers this machine cannot run fail before a tokenizer is trained
    check_loss_impl(cfg.train.loss_impl, dist.device, cfg.parallel.pp)
    run = prepare_run_dir(run_dir, resume, overwrite, is_main=dist.is_main)  # checks; changes files at commit()
    resume_path = run.resume_from
    get_console()  # imports rich, whose import draws from Python's RNG (rich.style): do it before seeding
    seed_everything(cfg.train.seed)
    device = dist.device
    precision = Precision(resolve_precision(cfg.train.precision, device), device)

    # Rank 0 trains/caches the tokenizer first; the others then read the cache.
    if dist.is_main:
        tokenizer = build_tokenizer(cfg.data, run_dir / "tokenizer")
    barrier()
    if not dist.is_main:
        tokenizer = build_tokenizer(cfg.data, run_dir / "tokenizer")
    cfg = resolve_model_vocab(cfg, tokenizer)

    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower train.seq_len or raise model.max_seq_len"
        )
    counts = param_counts(cfg.model)
    # built on meta; the engine materialises it after wrapping (each FSDP rank allocates only its shards)
    engine = build_engine(build_meta(cfg.model), cfg, dist, precision)  # pipeline -> AC -> compile -> FSDP2/DDP
    if cfg.train.init_from and resume_path is None:  # weights only; a resumed run restores its own checkpoint
        from tokenmill.train.init_from import load_initial_weights

        load_initial_weights(engine, cfg, tokenizer)
    plan: BatchPlan = plan_batches(
        cfg.train.micro_batch_size,
        cfg.train.seq_len,
        engine.dp_size,
        cfg.train.global_batch_tokens,
        cfg.train.total_tokens,
        cfg.train.max_steps,
        counts["total"],
        grad_accum=cfg.train.grad_accum,
    )
    lr_scale = scaled_lr(1.0, plan.global_batch_sequences, cfg.optim.lr_sqrt_batch_scaling)  # every group, Muon's too
    optimizer = engine.build_optimizer(lambda m: build_optimizer(m, cfg.optim, lr_scale=lr_scale))
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.total_steps, plan.tokens_per_step)
    scaler = precision.make_scaler()
    train_loader = build_loader(cfg, tokenizer, "train", engine.dp_rank, engine.dp_size)
    stability = cfg.stability
    detector = DivergenceDetector(
        stability.divergence_threshold,
        stability.divergence_fast_alpha,
        stability.divergence_slow_alpha,
        stability.divergence_warmup_steps,
    )
    state = TrainState()
    parts = {
        "model": ModelState(engine.model, sharded=engine.sharded),
        "optimizer": OptimizerState(optimizer, engine.optimizer_state_dict),
        "scheduler": scheduler,
        "loader": train_loader,
        "train": state,
        "detector": detector,
        "scaler": scaler,
    }
    checkpointer = Checkpointer(
        run_dir,
        cfg.checkpoint,
        parts,
        run_config=cfg,
        dist=dist,
        tokenizer_json=tokenizer.backend.to_str() if tokenizer.backend is not None else None,
        chat_template=chat_template_text(cfg.data),
    )
    cadence = build_cadence(cfg, plan, counts["total"])  # log / eval / checkpoint steps, for loop and monitor

    # ---- resume -------------------------------------------------------------------------------------------
    if resume_path is not None:
        checkpointer.load(resume_path)  # every part in place, and the RNG states
        resumed_rng = capture_rng()  # the checkpoint's RNG states, as load() restored them
    if dist.is_main:
        run.commit()  # set-up succeeded: only now replace a previous run's outputs (--overwrite)
    # built after resume: sinks rewind past events a killed run logged after its checkpoint (and reuse its W&B run)
    sinks = build_sinks(
        cfg.log, run_dir, dist.rank, config=cfg.to_dict(), resume_step=state.step if resume_path is not None else None
    )
    if dist.is_main:  # the heartbeat `tokenmill control list|status` reads
        sinks.sinks.append(StatusSink(run_dir, started_at, plan.total_steps))
    sinks.log(state.step, cfg.to_dict(), kind="config")  # the resolved config (vocab filled in)
    if resume_path is not None:
        sinks.log(state.step, {"path": str(resume_path)}, kind="resume")

    def save(reason: str, eval_result: dict[str, float] | None = None) -> None:
        """Checkpoint on every rank; `eval_result` only when an eval ran at this step (it ranks `best`)."""
        with control.protect():  # an interrupting Ctrl-C waits for the save to complete (and be logged)
            checkpointer.save(state.step, eval_loss=(eval_result or {}).get("loss"), reason=reason)
            sinks.log(state.step, {"path": str(checkpointer.last_path), "reason": reason}, kind="checkpoint")

    banner = build_banner(cfg, counts, plan, dist, precision.name, resumed_from=resume_path, cadence=cadence)
    sinks.log(state.step, banner.as_dict(), kind="startup")
    if dist.is_main:
        banner.print()
    monitor = StepMonitor(cfg, plan, cadence, counts, dist, sinks, start_step=state.step)
    # no eval split (data.eval_fraction=0, or no document hashed into it): found now, not after the last step
    eval_problem = check_eval_split(cfg, tokenizer, engine.dp_rank, engine.dp_size)
    skip_eval = any_rank(eval_problem is not None, device)
    if skip_eval:
        sinks.log(
            state.step,
            {"message": f"evaluation is skipped: {eval_problem or 'another rank has no eval data'}"},
            kind="warning",
        )

    def evaluate_now() -> dict[str, float] | None:
        """Eval on every rank and log it; None when skipped or failed (a failure is logged as a warning)."""
        if cfg.eval.tasks:  # lm-eval tasks on the whole model, held-out split or not; a failure is a warning too
            from tokenmill.eval.tasks import evaluate_tasks_in_training

            evaluate_tasks_in_training(engine, cfg, tokenizer, sinks, state.step)
        if skip_eval:
            return None
        try:
            result = run_eval(engine, cfg, tokenizer)
        except Exception as err:  # an eval only observes the run: report it and go on
            sinks.log(
                state.step,
                {"message": f"evaluation failed ({type(err).__name__}: {err}); training goes on"},
                kind="warning",
            )
            return None
        if result:
            state.best_eval_loss = min(state.best_eval_loss, result["loss"])
            sinks.log(state.step, result, kind="eval")
        return result

    # ---- loop ---------------------------------------------------------------------------------------------
    control = JobControl(run_dir, started_at, dist.is_main)  # signals and `tokenmill control` requests
    batches = iter(train_loader)
    if resume_path is not None:  # set-up since the load (sinks, iter) may have drawn: start from the saved RNG
        restore_rng(resumed_rng)
    losses: list[float] = []
    last_eval: dict[str, float] = {}
    status, exit_code = "completed", EXIT_OK
    try:
        while state.step < plan.total_steps:
            monitor.step_start()
            # accumulate: each micro-step's summed token loss / the step's valid targets over all ranks, so the
            # gradients are the per-token mean however many targets each micro-batch masks
            micro_batches = [next(batches) for _ in range(plan.grad_accum)]
            denominator = engine.loss_denominator(micro_batches)  # one all-reduce per step
            loss_sum = torch.zeros((), device=device)
            for micro, batch in enumerate(micro_batches):
                loss_sum += engine.forward_backward(batch, scaler, denominator, sync=micro == plan.grad_accum - 1)
            step_loss = all_reduce(loss_sum, "avg")

            # check and clip: decided before the optimizer step, identically on every rank
            scaler.unscale_(optimizer)
            grad_norm = engine.clip_grad_norm(cfg.train.grad_clip)
            # host sync, the step's only one on one process: the step decision and the detector need both values
            loss_value, norm_value = torch.stack([step_loss.float(), grad_norm.float()]).tolist()
            nonfinite = not (math.isfinite(loss_value) and math.isfinite(norm_value))
            if any_rank(nonfinite, device):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                state.skipped_steps += 1
                sinks.log(state.step, {"loss": loss_value, "grad_norm": norm_value}, kind="nonfinite")
                if stability.nonfinite_policy == "stop":
                    save("nonfinite")
                    status, exit_code = "nonfinite", EXIT_NONFINITE
                    break
                continue

            # step and schedule
            monitor.before_optimizer_step(engine.model)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            monitor.after_optimizer_step(engine.model)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += plan.tokens_per_step
            losses.append(loss_value)

            if detector.update(loss_value):
                sinks.log(state.step, {"loss": loss_value, "reason": detector.describe()}, kind="diverged")
                status, exit_code = "diverged", EXIT_DIVERGED
                break  # no save: the last periodic checkpoint is the last good one

            # log (SFT: the share of the step's target positions that carry loss, from the global denominator)
            if cadence.is_log_step(state.step):
                masked = {}
                if cfg.data.format != "text":
                    # host sync, on log steps only: the denominator is the step's global valid count / dp size
                    masked["valid_token_share"] = float(denominator) * engine.dp_size / plan.tokens_per_step
                monitor.log_step(
                    state.step,
                    loss_value,
                    grad_norm,
                    scheduler.get_last_lr()[0],
                    state.tokens_seen,
                    skipped=state.skipped_steps,
                    **masked,
                )

            # eval
            evaluated: dict[str, float] | None = None
            if cadence.is_eval_step(state.step):
                evaluated = evaluate_now()
                last_eval = evaluated or last_eval

            # checkpoint
            saved = cadence.is_checkpoint_step(state.step)
            if saved:
                save("interval", evaluated)

            # job control: one decision for every rank, the strongest request on any rank (abort > stop > save)
            action = control.carry_out(
                state.step,
                functools.partial(max_over_ranks, device=device),
                save,
                saved,
                lambda: checkpointer.last_path,
            )
            if action == Action.ABORT:
                status, exit_code = "aborted", abort_exit_code()
                if exit_code != EXIT_ABORTED:
                    sinks.log(state.step, {"message": ABORT_UNDER_RESTARTS}, kind="warning")
                break
            if action == Action.STOP:
                status = "stopped"
                break

        # ---- tear down --------------------------------------------------------------------------------------
        if status == "completed":
            last_eval = evaluate_now() or {}
            save("final", last_eval)
            if cfg.eval.sample_prompts:
                try:
                    write_samples(engine.inference_model(), cfg, tokenizer, dist, sinks, state.step)  # gathers shards
                except Exception as err:  # samples only illustrate the run: report and finish
                    sinks.log(state.step, {"message": f"samples failed ({type(err).__name__}: {err})"}, kind="warning")
    except KeyboardInterrupt:
        status = "interrupted"  # a third Ctrl-C (after any save in progress completed)
        raise
    except BaseException:
        status = "failed"  # the summary must not claim success while an error propagates
        raise
    finally:
        control.close()
        checkpointer.close()
        # documents that lost text (null/non-string fields, undecodable bytes) are counted by the loader, not fatal
        try:
            problems = loader_problem_lines(train_loader.stats())
        except Exception as err:  # tear-down must not replace the run's own outcome
            problems = [f"data quality counts unavailable ({type(err).__name__}: {err})"]
        train_loader.close()  # its background thread or workers stop with the run
        for line in problems:
            sinks.log(state.step, {"message": line.removeprefix("warning: ").removeprefix("note: ")}, kind="warning")
        sinks.log(
            state.step,
            {
                "status": status,
                "steps": state.step,
                "tokens_seen": state.tokens_seen,
                "skipped_steps": state.skipped_steps,
                "final_loss": losses[-1] if losses else None,
                "eval": last_eval,
            },
            kind="summary",
        )
        monitor.close()
        sinks.close()
    return TrainResult(status, exit_code, state, losses, last_eval, run_dir)

"""`grpo(cfg)`: GRPO with verifiable rewards, shaped like `train(cfg)`: set up, resume, loop, tear down.

Each step: draw `rl.prompts_per_step` prompts (this rank's share), sample `rl.group_size` completions of each
with the KV-cache engine, score them with the reward functions, turn rewards into group-relative advantages,
and make `rl.iterations_per_batch` optimizer steps on the clipped policy loss (finetune/objective.py) through
the same Engine as pretraining (its `loss_fn` slot), so DDP, FSDP, precision and gradient clipping are the
trainer's. Held-out exact match is measured with greedy decoding at the start, every `rl.eval_interval_steps`
and at the end, to catch a reward that rises without the task being solved (reward hacking).

Everything that decides the next rollout or update is in the checkpoint: weights, optimizer, schedule, the
prompt cursor and step (which fix the prompts and sampling seeds), and the RNG states (dropout). A resumed run
continues bit for bit on CPU. The output is a normal tokenmill checkpoint: generate, export, eval and serve read it.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.parts import ModelState, OptimizerState
from tokenmill.checkpoint.values import capture_rng, restore_rng
from tokenmill.config import Config
from tokenmill.errors import UserError
from tokenmill.finetune.objective import PolicyLoss, group_advantages, token_logprobs, zero_std_groups
from tokenmill.finetune.rewards import WeightedReward, build_rewards, call_reward, parse_reward, score
from tokenmill.finetune.rollout import (
    Rollout,
    build_batches,
    greedy_answers,
    group_seed,
    local_denominator,
    sample_groups,
)
from tokenmill.finetune.state import GRPOState, RolloutModel, build_reference
from tokenmill.finetune.tasks import Task, build_task
from tokenmill.jobs.actions import Action
from tokenmill.jobs.control import JobControl
from tokenmill.jobs.status import StatusSink
from tokenmill.metrics.sinks import build_sinks, get_console
from tokenmill.model import build_meta
from tokenmill.optim.optimizers import build_optimizer
from tokenmill.optim.schedules import build_scheduler
from tokenmill.parallel.dist import (
    DistInfo,
    all_reduce,
    any_rank,
    destroy_distributed,
    init_distributed,
    max_over_ranks,
)
from tokenmill.parallel.engine import build_engine
from tokenmill.train.loop import ABORT_UNDER_RESTARTS, EXIT_ABORTED, EXIT_OK, abort_exit_code, seed_everything
from tokenmill.train.precision import Precision, resolve_precision
from tokenmill.train.run_dir import prepare_run_dir


@dataclass
class GRPOResult:
    status: str  # completed | stopped | aborted
    exit_code: int
    state: GRPOState
    rewards: list[float] = field(default_factory=list)  # mean reward of each step, in order
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> held-out metrics
    run_dir: Path = Path(".")


def grpo(cfg: Config, resume: str | bool | None = None, overwrite: bool = False) -> GRPOResult:
    """Run (or resume) GRPO as `cfg` says, from the weights of `cfg.train.init_from`; returns how it ended."""
    dist = init_distributed(cfg.parallel, cfg.train.device)
    try:
        return _grpo(cfg, dist, resume, overwrite)
    finally:
        destroy_distributed()


def check_task(task: Task, rewards: list[WeightedReward], group_size: int) -> None:
    """Call every reward once on a group of the task's own answers, before any file is touched."""
    example = task.train[0]
    prompts = [example.prompt] * group_size
    fields: dict[str, list[Any]] = {name: [value] * group_size for name, value in example.columns.items()}
    fields.update(completion_ids=[[0]] * group_size, finish_reason=["stop"] * group_size)
    for reward in rewards:
        call_reward(reward, prompts, [example.answer] * group_size, fields)


def source_chat_template(init_from: str) -> str | None:
    """The chat template the starting checkpoint was fine-tuned with (SFT), carried into every RL checkpoint so
    serve and export keep formatting conversations the way the model learned."""
    from tokenmill.checkpoint.find import find_checkpoint
    from tokenmill.checkpoint.folder import CHAT_TEMPLATE

    path = find_checkpoint(init_from) / CHAT_TEMPLATE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def check_prompt_lengths(task: Task, tokenizer: Any, max_new_tokens: int, max_seq_len: int) -> None:
    """Every prompt plus a full completion must fit the model's context; found before anything is written."""
    prompts = [e.prompt for e in (*task.train, *task.heldout)]
    lengths = [len(ids) for ids in tokenizer.encode_batch(prompts)]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > max_seq_len:
        raise UserError(
            f"task {task.name}: prompt {prompts[longest][:40]!r}... has {lengths[longest]} tokens, which with "
            f"rl.max_new_tokens={max_new_tokens} exceeds model.max_seq_len={max_seq_len}; shorten the prompts "
            f"or lower rl.max_new_tokens"
        )


def _grpo(cfg: Config, dist: DistInfo, resume: str | bool | None, overwrite: bool) -> GRPOResult:
    # ---- set up -------------------------------------------------------------------------------------------
    started_at = time.time()
    rl = cfg.rl
    run_dir = Path(cfg.train.out_dir)
    if not cfg.train.init_from:
        raise UserError("tokenmill rl needs a starting checkpoint: --from CHECKPOINT (train.init_from)")
    if cfg.parallel.pp > 1:
        raise UserError("tokenmill rl needs parallel.pp=1: pipeline stages end in the pretraining loss")
    dp_size = dist.world_size
    if rl.prompts_per_step % dp_size:
        raise UserError(
            f"rl.prompts_per_step={rl.prompts_per_step} does not divide over {dp_size} ranks; "
            f"use a multiple of {dp_size}"
        )
    task = build_task(rl.task, rl.eval_fraction, rl.task_file)  # a bad task file fails before anything is written
    rewards = build_rewards(rl.rewards or task.rewards)
    check_task(task, rewards, rl.group_size)
    from tokenmill.api import load_tokenizer

    tokenizer = load_tokenizer(cfg.train.init_from)
    check_prompt_lengths(task, tokenizer, rl.max_new_tokens, cfg.model.max_seq_len)
    run = prepare_run_dir(run_dir, resume, overwrite, is_main=dist.is_main)
    resume_path = run.resume_from
    get_console()  # imports rich, whose import draws from Python's RNG: do it before seeding
    seed_everything(cfg.train.seed)
    device = dist.device
    precision = Precision(resolve_precision(cfg.train.precision, device), device)

    policy_loss = PolicyLoss(rl)
    engine = build_engine(build_meta(cfg.model), cfg, dist, precision, loss_fn=policy_loss)
    if resume_path is None:  # a resumed run restores its own weights
        from tokenmill.train.init_from import load_initial_weights

        load_initial_weights(engine, cfg, tokenizer)
    reference = build_reference(cfg.train.init_from, device) if rl.beta > 0 else None  # beta=0: none at all
    rollout_model = RolloutModel(engine)
    optimizer = engine.build_optimizer(lambda m: build_optimizer(m, cfg.optim))
    total_updates = rl.steps * rl.iterations_per_batch
    scheduler = build_scheduler(optimizer, cfg.schedule, total_updates, 1)
    scaler = precision.make_scaler()
    state = GRPOState()
    parts = {
        "model": ModelState(engine.model, sharded=engine.sharded),
        "optimizer": OptimizerState(optimizer, engine.optimizer_state_dict),
        "scheduler": scheduler,
        "train": state,
        "scaler": scaler,
    }
    checkpointer = Checkpointer(
        run_dir,
        cfg.checkpoint,
        parts,
        run_config=cfg,
        dist=dist,
        tokenizer_json=tokenizer.backend.to_str() if tokenizer.backend is not None else None,
        chat_template=source_chat_template(cfg.train.init_from),
    )

    # ---- resume -------------------------------------------------------------------------------------------
    if resume_path is not None:
        checkpointer.load(resume_path)
        resumed_rng = capture_rng()
    if dist.is_main:
        run.commit()  # set-up succeeded: only now replace a previous run's outputs (--overwrite)
    sinks = build_sinks(
        cfg.log, run_dir, dist.rank, config=cfg.to_dict(), resume_step=state.step if resume_path is not None else None
    )
    if dist.is_main:
        sinks.sinks.append(StatusSink(run_dir, started_at, rl.steps))
    sinks.log(state.step, cfg.to_dict(), kind="config")
    if resume_path is not None:
        sinks.log(state.step, {"path": str(resume_path)}, kind="resume")
    my_prompts = rl.prompts_per_step // dp_size
    first_prompt = dist.rank * my_prompts  # this rank's block of the step's global prompt indices

    def save(reason: str) -> None:
        with control.protect():
            checkpointer.save(state.step, reason=reason)
            sinks.log(state.step, {"path": str(checkpointer.last_path), "reason": reason}, kind="checkpoint")

    def evaluate_now() -> dict[str, float]:
        """Greedy held-out exact match on every rank's slice of the held-out prompts, summed over ranks."""
        examples = task.heldout[: rl.eval_prompts][dist.rank :: dp_size]
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, reward, count
        model = rollout_model.current()  # a collective when sharded: every rank, examples or not
        if examples:
            answers = greedy_answers(model, tokenizer, examples, rl.max_new_tokens)
            prompts, fields = answers.per_sample(1)
            reward, each = score(rewards, prompts, answers.texts, fields)
            correct = sum(value >= 1.0 for value in each.get(task.correct) or _correct(task, prompts, answers, fields))
            totals += torch.tensor([correct, sum(reward), len(examples)], dtype=torch.float64, device=device)
        all_reduce(totals, "sum")
        count = float(totals[2])
        if count == 0:
            sinks.log(state.step, {"message": f"task {task.name} has no held-out prompts to evaluate"}, kind="warning")
            return {}
        result = {"accuracy": float(totals[0]) / count, "reward": float(totals[1]) / count, "prompts": count}
        sinks.log(state.step, result, kind="eval")
        return result

    # ---- loop ---------------------------------------------------------------------------------------------
    control = JobControl(run_dir, started_at, dist.is_main)
    if resume_path is not None:
        restore_rng(resumed_rng)  # set-up since the load may have drawn
    step_rewards: list[float] = []
    evals: dict[int, dict[str, float]] = {}
    status, exit_code = "completed", EXIT_OK
    zero_std_streak = False
    try:
        if state.step == 0:
            evals[0] = evaluate_now()
        while state.step < rl.steps:
            step_start = time.perf_counter()
            # rollouts: this rank's prompts, each group sampled with its own seed
            indices = range(first_prompt, first_prompt + my_prompts)
            examples = [task.train_example(cfg.train.seed, state.prompts_seen + i) for i in indices]
            seeds = [group_seed(cfg.train.seed, state.step, i) for i in indices]
            rollout = sample_groups(rollout_model.current(), tokenizer, examples, seeds, rl)

            # rewards and advantages (groups never span ranks, so advantages need no communication)
            prompts, fields = rollout.per_sample(rl.group_size)
            reward_list, each = score(rewards, prompts, rollout.texts, fields)
            reward = torch.tensor(reward_list, dtype=torch.float64)
            advantages = group_advantages(reward, rl.group_size, rl.scale_rewards)
            batches = build_batches(
                rollout, advantages, rl.group_size, rl.loss_norm, _pad_id(tokenizer), rl.micro_batch_size
            )
            with torch.no_grad(), precision.autocast():
                for batch in batches:
                    on_device = {k: v.to(device) for k, v in batch.items()}
                    if rl.iterations_per_batch > 1:  # the rollout policy's log-probs, fixed for every iteration
                        batch["old_logprobs"] = token_logprobs(
                            engine.model, on_device["tokens"], on_device["targets"], rl.temperature
                        )[0].cpu()
                    if reference is not None:
                        batch["ref_logprobs"] = token_logprobs(
                            reference, on_device["tokens"], on_device["targets"], rl.temperature
                        )[0].cpu()
            local = local_denominator(batches, rl.loss_norm, rl.max_new_tokens)
            denominator = all_reduce(torch.tensor(local, dtype=torch.float64, device=device), "sum") / dp_size

            # update: iterations_per_batch optimizer steps on this batch
            losses, grad_norm = [], torch.zeros(())
            for _ in range(rl.iterations_per_batch):
                loss_sum = torch.zeros((), device=device)
                for index, batch in enumerate(batches):
                    loss_sum += engine.forward_backward(
                        batch, scaler, denominator.float(), sync=index == len(batches) - 1
                    )
                losses.append(all_reduce(loss_sum, "avg").item())
                scaler.unscale_(optimizer)
                grad_norm = engine.clip_grad_norm(cfg.train.grad_clip)
                if any_rank(not (math.isfinite(losses[-1]) and math.isfinite(float(grad_norm))), device):
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                    state.skipped_steps += 1
                    sinks.log(state.step, {"loss": losses[-1], "grad_norm": float(grad_norm)}, kind="nonfinite")
                    continue
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.optimizer_steps += 1
            state.step += 1
            state.prompts_seen += rl.prompts_per_step

            # log: every number is over all ranks
            metrics = _step_metrics(rollout, reward, each, policy_loss.take(), rl.group_size, device)
            state.tokens_seen += int(metrics.pop("tokens_trained"))
            metrics.update(
                loss=sum(losses) / len(losses),
                grad_norm=float(grad_norm),
                lr=scheduler.get_last_lr()[0],
                step_time_s=time.perf_counter() - step_start,
                total_steps=rl.steps,
                tokens_seen=state.tokens_seen,
            )
            step_rewards.append(metrics["reward"])
            sinks.log(state.step, metrics, kind="train")
            if rl.log_samples:
                shown = {f"{p!r} #{i}": t for i, (p, t) in enumerate(zip(prompts, rollout.texts, strict=True))}
                sinks.log(state.step, {"samples": dict(list(shown.items())[: rl.log_samples])}, kind="sample")
            if metrics["frac_reward_zero_std"] > rl.zero_std_warning and not zero_std_streak:
                sinks.log(
                    state.step,
                    {
                        "message": f"{100 * metrics['frac_reward_zero_std']:.0f}% of groups gave every sample the "
                        f"same reward, so they teach nothing: raise rl.group_size or rl.temperature, add partial "
                        f"credit to the reward, or warm the model up with SFT first"
                    },
                    kind="warning",
                )
            zero_std_streak = metrics["frac_reward_zero_std"] > rl.zero_std_warning

            # eval and checkpoint
            if rl.eval_interval_steps and state.step % rl.eval_interval_steps == 0 and state.step < rl.steps:
                evals[state.step] = evaluate_now()
            saved = bool(cfg.checkpoint.interval_steps) and state.step % cfg.checkpoint.interval_steps == 0
            if saved and state.step < rl.steps:
                save("interval")

            # job control: the strongest request on any rank
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

        # ---- tear down ----------------------------------------------------------------------------------------
        if status == "completed":
            evals[state.step] = evaluate_now()
            save("final")
    except BaseException:
        status = "failed"
        raise
    finally:
        control.close()
        checkpointer.close()
        first = evals.get(0, {}).get("accuracy")
        last = evals.get(state.step, {}).get("accuracy")
        sinks.log(
            state.step,
            {
                "status": status,
                "steps": state.step,
                "reward_first": step_rewards[0] if step_rewards else None,
                "reward_last": step_rewards[-1] if step_rewards else None,
                "heldout_accuracy_start": first,
                "heldout_accuracy_end": last,
            },
            kind="summary",
        )
        sinks.close()
    return GRPOResult(status, exit_code, state, step_rewards, evals, run_dir)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def _correct(task: Task, prompts: list[str], answers: Rollout, fields: dict[str, list]) -> list[float]:
    """The task's `correct` reward, when rl.rewards does not include it."""
    return call_reward(parse_reward(task.correct), prompts, answers.texts, fields)


def _step_metrics(
    rollout: Rollout,
    reward: torch.Tensor,
    each: dict[str, list[float]],
    totals: dict[str, torch.Tensor],
    group_size: int,
    device: torch.device,
) -> dict[str, float]:
    """The step's metrics over all ranks: one all-reduce of sums and one of maxima."""
    lengths = [len(s.token_ids) for s in rollout.samples]
    truncated = sum(s.finish_reason == "length" for s in rollout.samples)
    prompt_tokens = sum(len(rollout.prompt_ids[i // group_size]) for i in range(len(rollout.samples)))
    names = sorted(each)
    sums = [
        float(len(reward)),
        float(reward.sum()),
        float((reward**2).sum()),
        float(zero_std_groups(reward, group_size).sum()),
        float(len(reward) // group_size),
        float(sum(lengths)),
        float(truncated),
        float(prompt_tokens),
        *(float(totals.get(name, torch.zeros(())).item()) for name in ("tokens", "entropy", "clipped", "kl")),
        *(float(sum(each[name])) for name in names),
    ]
    summed = all_reduce(torch.tensor(sums, dtype=torch.float64, device=device), "sum").tolist()
    longest = all_reduce(torch.tensor([float(max(lengths))], dtype=torch.float64, device=device), "max").item()
    n, r_sum, r2_sum, zero, groups, length_sum, truncated_sum, prompt_sum, tokens, entropy, clipped, kl = summed[:12]
    mean = r_sum / n
    metrics = {
        "reward": mean,
        "reward_std": math.sqrt(max(0.0, r2_sum / n - mean * mean) * n / max(1.0, n - 1)),
        "frac_reward_zero_std": zero / groups,
        "completion_length_mean": length_sum / n,
        "completion_length_max": longest,
        "completion_truncated": truncated_sum / n,
        "clip_fraction": clipped / max(1.0, tokens),
        "kl": kl / max(1.0, tokens),
        "entropy": entropy / max(1.0, tokens),
        "tokens_trained": length_sum + prompt_sum,
    }
    for name, value in zip(names, summed[12:], strict=True):
        metrics[f"reward/{name}"] = value / n
    return metrics

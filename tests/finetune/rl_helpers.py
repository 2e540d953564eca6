"""Tiny RL fixtures: a random-init byte-tokenizer checkpoint, `tokenmill rl` arguments, and a GRPO run that can be
called in-process or on spawned gloo ranks (dist_helpers.run_ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A 2-layer width-32 model: an RL step (16 samples of <= 4 tokens) takes well under a second on one CPU thread.
MODEL_OVERRIDES = (
    "data.tokenizer=byte",
    "model.vocab_size=320",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.max_seq_len=32",
    "model.ffn_hidden=64",
    "model.dropout=0.0",
)
RL_OVERRIDES = (
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.max_new_tokens=4",
    "rl.eval_prompts=8",
    "rl.eval_interval_steps=2",
    "rl.log_samples=1",
    "rl.rewards=[rl_rewards:first_byte,position_match:0.5,exact_eos:0.5]",
    "optim.lr=1e-3",
    "train.precision=fp32",
    "train.device=cpu",
    "log.progress_bar=false",
    "parallel.timeout_s=60",
)


def make_checkpoint(run_dir: Path, *overrides: str, seed: int = 0, chat_template: str | None = None) -> Path:
    """A run folder with one weights-only checkpoint of a random-init model (what `tokenmill rl --from` reads)."""
    import tokenmill
    from tokenmill.checkpoint.manager import Checkpointer
    from tokenmill.config import load_config

    cfg = load_config(["tiny"], overrides=[*MODEL_OVERRIDES, *overrides])
    torch.manual_seed(seed)
    model = tokenmill.create_model(cfg)
    Checkpointer(run_dir, cfg.checkpoint, {"model": model}, run_config=cfg, chat_template=chat_template).save(1)
    return run_dir


def rl_args(source: Path, out: Path, *extra: str, task: str = "copy") -> list[str]:
    """`tokenmill rl` arguments (after the program name)."""
    return [
        "rl",
        "--from",
        str(source),
        "--task",
        task,
        f"--train.out_dir={out}",
        *("--" + o for o in RL_OVERRIDES),
        *extra,
    ]


def rl_config(source: Path, out: Path, *extra: str, task: str = "copy") -> Any:
    """The Config `tokenmill rl` would run with those arguments."""
    from tokenmill.cli import build_parser
    from tokenmill.cli.common import overrides_from_args
    from tokenmill.cli.rl import config_from_rl_args
    from tokenmill.config import split_overrides

    parser, _ = build_parser("rl")
    args, extras = parser.parse_known_args(rl_args(source, out, *extra, task=task))
    args.overrides = overrides_from_args(args) + split_overrides(extras)
    return config_from_rl_args(args)


def run_grpo(source: str, out: str, extra: tuple[str, ...], resume: Any = None) -> dict[str, Any]:
    """One GRPO run (on every rank when spawned); returns its step rewards, held-out evals and final weights."""
    from tokenmill.checkpoint.find import latest_checkpoint
    from tokenmill.checkpoint.folder import WEIGHTS
    from tokenmill.checkpoint.sharded import read_full_weights
    from tokenmill.checkpoint.weights import read_weights
    from tokenmill.finetune.grpo import grpo

    torch.set_num_threads(1)
    result = grpo(rl_config(Path(source), Path(out), *extra), resume=resume)
    final = latest_checkpoint(Path(out) / "checkpoints")
    return {
        "status": result.status,
        "rewards": result.rewards,
        "evals": result.evals,
        "weights": read_weights(final) if (final / WEIGHTS).is_file() else read_full_weights(final),  # FSDP: shards
    }

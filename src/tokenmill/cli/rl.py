"""`tokenmill rl --from CHECKPOINT --task TASK [--section.key=value ...]`: GRPO with verifiable rewards.

The run config is the checkpoint's own (model, tokenizer, parallel layout), with RL defaults on top (AdamW at a
constant learning rate of 1e-5 without weight decay, a new out_dir) and then your overrides. `--write-sft-set PATH`
writes the task's supervised warm-up set instead (a jsonl of prompt/completion pairs from its training prompts).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenmill.cli.common import add_config_arguments

SFT_EXAMPLES = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", metavar="CHECKPOINT", help="checkpoint or run folder to start from")
    parser.add_argument("--task", metavar="TASK", help="copy, reverse, addition or mcq (with --rl.task_file)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the latest valid checkpoint in out_dir, or from PATH",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints in out_dir")
    parser.add_argument(
        "--write-sft-set",
        metavar="PATH",
        help="write the task's SFT warm-up set (jsonl of prompt/completion) to PATH and exit",
    )
    parser.add_argument(
        "--sft-examples", type=int, default=SFT_EXAMPLES, metavar="N", help="examples in --write-sft-set"
    )
    add_config_arguments(parser)


def rl_defaults(task: str, source: Path) -> dict[str, Any]:
    """What RL changes in the checkpoint's config before the user's overrides (the pretraining optimizer, schedule,
    peak LR and weight decay belong to pretraining: small AdamW steps keep the policy near what it knows; RL starts
    from the checkpoint's weights in a new folder)."""
    return {
        "train": {"init_from": str(source), "out_dir": f"runs/rl-{task}"},
        "optim": {"name": "adamw", "lr": 1e-5, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "rl": {"task": task},
    }


def config_from_rl_args(args: argparse.Namespace) -> Any:
    from tokenmill.checkpoint.find import find_checkpoint
    from tokenmill.config import apply_override, config_from_dict, deep_merge, load_file, parse_override
    from tokenmill.errors import ConfigError

    if args.preset:
        raise ConfigError("--preset does not apply to tokenmill rl: the model and tokenizer come from --from")
    if not args.source:
        raise ConfigError("tokenmill rl needs --from CHECKPOINT (a checkpoint or run folder to fine-tune)")
    folder = find_checkpoint(args.source)
    data = deep_merge(checkpoint_config(folder), rl_defaults(args.task, folder))
    if args.config_file is not None:
        data = deep_merge(data, load_file(args.config_file))
    for text in args.overrides:
        data = apply_override(data, *parse_override(text))
    return config_from_dict(data)


def checkpoint_config(folder: Path) -> dict[str, Any]:
    """The run config saved beside a checkpoint's weights, as a mapping."""
    import yaml

    from tokenmill.checkpoint.folder import CONFIG
    from tokenmill.errors import UserError

    path = folder / CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"checkpoint {folder} has no readable {CONFIG} ({type(err).__name__}); pick another") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a mapping of config sections; pick another checkpoint")
    return data


def write_sft(args: argparse.Namespace) -> int:
    from tokenmill.config import load_config
    from tokenmill.errors import ConfigError
    from tokenmill.finetune.tasks import build_task, write_sft_set

    if args.sft_examples < 1:
        raise ConfigError(f"--sft-examples {args.sft_examples} is not allowed: give a number >= 1")
    cfg = load_config([], args.config_file, [f"rl.task={args.task}", *args.overrides])
    task = build_task(cfg.rl.task, cfg.rl.eval_fraction, cfg.rl.task_file)
    path = write_sft_set(task, args.write_sft_set, args.sft_examples, cfg.train.seed)
    print(f"wrote {args.sft_examples} {task.name} examples ({len(task.train)} distinct training prompts) to {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from tokenmill.errors import ConfigError

    if not args.task:
        raise ConfigError("tokenmill rl needs --task: copy, reverse, addition or mcq")
    if args.write_sft_set:
        return write_sft(args)
    from tokenmill.finetune.grpo import grpo

    result = grpo(config_from_rl_args(args), resume=args.resume, overwrite=args.overwrite)
    return result.exit_code

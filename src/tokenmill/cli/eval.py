"""`tokenmill eval RUN|CHECKPOINT --source S | --tasks T1,T2`: evaluate a checkpoint.

--source: loss, perplexity and bits per byte over every document of a data source (anything `data.sources`
accepts, pre-tokenized shards included), in non-overlapping windows of the model's context or sliding ones
(--stride); deterministic, so the same checkpoint always gives the same numbers.
--tasks: lm-evaluation-harness tasks through tokenmill's native adapter (the `eval` extra); task data comes from
the Hugging Face Hub, or from local task YAMLs given with --include-path (docs/eval.md).
Results are printed, written as JSON under `<run>/eval/`, and logged to the run's metrics sinks.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="RUN|CHECKPOINT",
        help="checkpoint folder, or run folder (its latest valid checkpoint; --best for the best)",
    )
    parser.add_argument("--best", action="store_true", help="from a run folder, the best checkpoint by eval loss")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    source = parser.add_argument_group("loss over a data source")
    source.add_argument(
        "--source", metavar="S", help="data source: stdlib, a file or folder, a shards folder, a Hub dataset"
    )
    source.add_argument("--text-field", default="text", help="text column of json/parquet/Hub sources")
    source.add_argument("--seq-len", type=int, default=0, metavar="N", help="window length; 0 = the model's context")
    source.add_argument(
        "--stride",
        type=int,
        default=0,
        metavar="S",
        help="slide windows by S tokens, scoring only new tokens; 0 = non-overlapping windows",
    )
    source.add_argument(
        "--split",
        default="all",
        choices=("all", "train", "eval"),
        help="for a shards folder: which prepared split(s) to score",
    )
    tasks = parser.add_argument_group("lm-evaluation-harness tasks")
    tasks.add_argument("--tasks", metavar="T1,T2", help="comma-separated lm-eval task or group names")
    tasks.add_argument("--include-path", metavar="DIR", help="folder of extra task YAMLs (local datasets)")
    tasks.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction)")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    tasks.add_argument(
        "--bootstrap-iters", type=int, default=0, help="bootstrap samples for standard errors; 0 = none (fast)"
    )
    tasks.add_argument(
        "--max-gen-toks", type=int, default=256, help="token budget of generation tasks unless the task sets one"
    )
    tasks.add_argument("--seed", type=int, default=1234, help="seed of few-shot sampling and sampled generation")


def run(args: argparse.Namespace) -> int:
    if not args.source and not args.tasks:
        raise UserError(
            "nothing to evaluate: pass --source S (loss, perplexity, bits per byte) and/or --tasks T1,T2 "
            "(lm-evaluation-harness)"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    task_names = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if args.tasks:
        from tokenmill.eval.tasks import check_task_names, require_lm_eval, task_manager

        require_lm_eval()  # a missing extra or an unknown task fails before the model is loaded
        check_task_names(task_names, task_manager(args.include_path))
    from tokenmill.interop.loading import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, "best" if args.best else "latest", device=_device(args.device))
    print(f"evaluating {loaded.folder} (step {loaded.step})")
    if args.source:
        _eval_source(args, loaded)
    if task_names:
        _eval_tasks(args, loaded, task_names)
    return 0


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return name


def _eval_source(args: argparse.Namespace, loaded: Any) -> None:
    from rich.console import Console
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from tokenmill.eval.results import log_to_run, results_path, save_json
    from tokenmill.eval.source import describe_source, score_source

    console = Console(stderr=True)
    with Progress(
        TextColumn("scoring {task.description}"),
        TextColumn("{task.completed:,.0f} tokens"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(args.source, total=None)
        result = score_source(
            loaded.model,
            loaded.tokenizer,
            args.source,
            seq_len=args.seq_len or None,
            stride=args.stride or None,
            batch_size=args.batch_size,
            text_field=args.text_field,
            split=args.split,
            progress=lambda n: bar.advance(task, n),
        )
    record = {"source": args.source, "checkpoint": str(loaded.folder), **result}
    path = save_json(results_path(loaded.run_dir, loaded.step, f"source-{describe_source(args.source)}"), record)
    log_to_run(loaded.run_dir, loaded.config, loaded.step, record, kind="eval_source")
    print(
        f"{args.source}: loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | bpb {result['bpb']:.4f} | "
        f"{result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['documents']:,} documents "
        f"(windows of {result['seq_len']}, stride {result['stride']}) -> {path}"
    )


def _eval_tasks(args: argparse.Namespace, loaded: Any, task_names: list[str]) -> None:
    from lm_eval.utils import make_table

    from tokenmill.eval.results import log_to_run, results_path, save_json
    from tokenmill.eval.source import describe_source
    from tokenmill.eval.tasks import run_tasks, task_scores

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(
        loaded.model,
        loaded.tokenizer,
        task_names,
        include_path=args.include_path,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
        max_gen_toks=args.max_gen_toks,
    )
    results["checkpoint"] = str(loaded.folder)
    label = describe_source("+".join(task_names))
    path = save_json(results_path(loaded.run_dir, loaded.step, f"tasks-{label}"), results)
    log_to_run(loaded.run_dir, loaded.config, loaded.step, task_scores(results), kind="eval_tasks")
    print(make_table(results))
    print(f"results -> {path}")

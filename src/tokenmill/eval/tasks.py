"""lm-evaluation-harness tasks on a tokenmill model, through the native adapter (interop/lm_eval.py).

Used by `tokenmill eval --tasks` and, with `eval.tasks`, at every evaluation of a training run. lm-eval is
the optional `eval` extra; it finds tasks by name in its own task folders, in `include_path` folders of task
YAMLs, or as inline config dicts (docs/eval.md). lm-eval seeds Python's, NumPy's and torch's global RNGs when it
starts; they are restored afterwards, so evaluating inside a training run does not change what it trains on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError

EXTRA = "pip install 'tokenmill[eval]'"


def require_lm_eval() -> Any:
    """The adapter module (it imports lm_eval), or a one-line UserError naming the extra to install."""
    try:
        return importlib.import_module("tokenmill.interop.lm_eval")
    except ImportError as err:
        raise UserError(f"lm-eval tasks need lm-evaluation-harness ({err.name or err} is missing): {EXTRA}") from None


@functools.cache
def task_manager(include_path: str | None = None, include_defaults: bool = True) -> Any:
    """lm-eval's TaskManager (indexing its thousands of task files takes tens of seconds: built once per process)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_task_names(names: list[str], manager: Any) -> None:
    """Refuse unknown task (or group, or tag) names before any model work, naming the first few."""
    known = set(manager.match_tasks(names))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(
            f"unknown lm-eval task {', '.join(unknown[:3])}: list tasks with `lm-eval ls tasks`, or "
            f"pass --include-path DIR with your task YAMLs"
        )


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str | dict[str, Any]],
    *,
    include_path: str | None = None,
    include_defaults: bool = True,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 0,
    seed: int = 1234,
    max_gen_toks: int = 256,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict (`results`, `configs`, `versions`, `n-shot`, ...) for `tasks` on `model`.

    `tasks` are names (checked first) or inline task config dicts. `bootstrap_iters=0` skips the standard-error
    bootstrap. The global RNG states are the same after the call as before.
    """
    from tokenmill.checkpoint.values import capture_rng, restore_rng

    adapter = require_lm_eval()
    import lm_eval

    manager = task_manager(include_path, include_defaults)
    check_task_names([t for t in tasks if isinstance(t, str)], manager)
    lm = adapter.TokenmillLM(
        model=model, tokenizer=tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed, autocast=autocast
    )
    rng = capture_rng()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        restore_rng(rng)
    if results is None:  # simple_evaluate returns None on non-zero ranks only; this is one process
        raise RuntimeError("lm-eval returned no results")
    return results


def task_scores(results: dict[str, Any]) -> dict[str, float]:
    """{"task/metric": value} for every numeric score of every task (lm-eval's "acc,none" keys lose the filter
    name when it is "none"; standard errors are left out)."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")  # keys without a filter (sample_len) are not scores
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not comma or metric.endswith("_stderr") or not numeric:
                continue
            scores[f"{task}/{metric if filter_name in ('', 'none') else f'{metric},{filter_name}'}"] = float(value)
    return scores


def evaluate_tasks_in_training(engine: Any, cfg: Any, tokenizer: Any, sinks: Any, step: int) -> dict[str, float]:
    """Run `eval.tasks` on the whole model, save the results under `<out_dir>/eval/` and log an `eval_tasks`
    event; returns the scores ({} off rank 0).

    Every rank calls it (gathering a sharded model is a collective); rank 0 scores while the others go on to
    wait at their next collective, so keep `eval.tasks_limit` small enough to finish within the process group's
    timeout. Like a failed held-out evaluation, a failure (a missing extra, an unknown task) is logged as a
    warning and training goes on.
    """
    from tokenmill.eval.results import results_path, save_json

    model = engine.inference_model()  # the plain model on rank 0 (gathered when sharded), None elsewhere
    if model is None or not engine.dist.is_main:
        return {}
    try:
        results = run_tasks(
            model,
            tokenizer,
            list(cfg.eval.tasks),
            include_path=cfg.eval.tasks_include_path or None,
            limit=cfg.eval.tasks_limit or None,
            seed=cfg.train.seed,
            autocast=engine.precision.autocast,
        )
    except Exception as err:  # evaluation only observes the run: report it and go on
        sinks.log(
            step, {"message": f"lm-eval tasks failed ({type(err).__name__}: {err}); training goes on"}, kind="warning"
        )
        return {}
    save_json(results_path(cfg.train.out_dir, step, "tasks"), results)
    scores = task_scores(results)
    sinks.log(step, scores, kind="eval_tasks")
    return scores

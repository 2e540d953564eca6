"""lm-eval tasks from tokenmill (`tokenmill eval --tasks`, `eval.tasks`): results as JSON and metrics
events, the global RNG untouched (a training run that evaluates tasks trains exactly as one that does not),
and one-line refusals for unknown tasks and a missing extra."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch

from tokenmill.api import create_model
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.config import load_config
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError
from tokenmill.eval import tasks as tasks_module
from tokenmill.eval.tasks import task_scores
from tokenmill.metrics.sinks import read_jsonl

MODEL = [
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.vocab_size=320",
    "model.max_seq_len=64",
]
ROWS = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(8)]


@pytest.fixture
def task_dir(tmp_path):
    """A folder with one multiple-choice task YAML over a local JSONL file (what --include-path takes)."""
    data = tmp_path / "even.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tm_even.yaml").write_text(
        f"task: tm_even\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


@pytest.fixture
def fast_tasks(monkeypatch):
    """Index only --include-path folders (lm-eval's own thousands of task files take tens of seconds)."""
    pytest.importorskip("lm_eval")
    index = tasks_module.task_manager
    monkeypatch.setattr(tasks_module, "task_manager", lambda path=None, defaults=True: index(path, False))


def test_task_scores_flatten_lm_eval_results():
    results = {
        "results": {
            "arc": {
                "alias": "arc",
                "sample_len": 4,
                "acc,none": 0.5,
                "acc_stderr,none": "N/A",
                "acc_norm,none": 0.25,
                "acc_norm_stderr,none": 0.1,
            },
            "gsm": {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 0},
        }
    }
    assert task_scores(results) == {
        "arc/acc": 0.5,
        "arc/acc_norm": 0.25,
        "gsm/exact_match,strict-match": 1.0,
        "gsm/exact_match,flexible-extract": 0.0,
    }


def test_run_tasks_leaves_the_global_rng_alone(task_dir, fast_tasks):
    torch.manual_seed(0)
    model = create_model(load_config(["tiny"], overrides=MODEL))

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    results = tasks_module.run_tasks(model, Tokenizer.byte(), ["tm_even"], include_path=str(task_dir), limit=4)
    assert draws() == expected
    assert 0.0 <= task_scores(results)["tm_even/acc"] <= 1.0
    with pytest.raises(UserError, match="unknown lm-eval task nope"):
        tasks_module.run_tasks(model, Tokenizer.byte(), ["nope"], include_path=str(task_dir))


def without_lm_eval(monkeypatch) -> None:
    """Make every `import lm_eval...` fail, as when the `eval` extra is not installed."""
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")] or ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "tokenmill.interop.lm_eval", raising=False)


def test_missing_extra_is_one_line(monkeypatch):
    without_lm_eval(monkeypatch)
    with pytest.raises(UserError, match=r"pip install 'tokenmill\[eval\]'"):
        tasks_module.require_lm_eval()


def tiny_run_config(out_dir, corpus, *extra):
    return load_config(
        ["tiny"],
        overrides=[
            *MODEL,
            "data.tokenizer=byte",
            f"data.sources=[{corpus}]",
            f"train.out_dir={out_dir}",
            "train.seq_len=16",
            "train.micro_batch_size=2",
            "train.max_steps=4",
            "eval.interval_steps=2",
            "eval.max_batches=1",
            "train.device=cpu",
            "train.precision=fp32",
            "eval.sample_tokens=2",
            "eval.sample_prompts=[x]",
            "log.progress_bar=false",
            "schedule.warmup_steps=1",
            *extra,
        ],
    )


def test_training_runs_tasks_at_each_eval_without_changing_training(task_dir, fast_tasks, tmp_path):
    from tokenmill.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: {'abc ' * (i % 9)}" for i in range(300)))
    plain = train(tiny_run_config(tmp_path / "plain", corpus))
    tasks = train(
        tiny_run_config(
            tmp_path / "tasks",
            corpus,
            "eval.tasks=[tm_even]",
            f"eval.tasks_include_path={task_dir}",
            "eval.tasks_limit=4",
        )
    )
    assert tasks.losses == plain.losses  # lm-eval's seeding did not touch the training RNG
    events = read_jsonl(tmp_path / "tasks" / "metrics.jsonl", "eval_tasks")
    assert [e["step"] for e in events] == [2, 4] and all("tm_even/acc" in e for e in events)
    assert json.loads((tmp_path / "tasks" / "eval" / "step_00000004-tasks.json").read_text())["results"]["tm_even"]


@pytest.fixture
def saved_run(tmp_path):
    cfg = load_config(["tiny"], overrides=[*MODEL, "data.tokenizer=byte", f"train.out_dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    Checkpointer(tmp_path / "run", cfg.checkpoint, {"model": create_model(cfg)}, run_config=cfg).save(3)
    return tmp_path / "run"


def test_cli_missing_extra_is_refused_before_loading(saved_run, capsys, monkeypatch):
    from tokenmill.cli import main

    without_lm_eval(monkeypatch)
    assert main(["eval", str(saved_run), "--tasks", "arc_easy"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pip install 'tokenmill[eval]'" in err[0]


@pytest.mark.slow
def test_cli_tasks_write_results_and_refuse_unknown_tasks(saved_run, task_dir, capsys):
    """Through lm-eval's full task index (slow: it reads every task file lm-eval ships)."""
    pytest.importorskip("lm_eval")
    from tokenmill.cli import main

    args = ["eval", str(saved_run), "--tasks", "tm_even", "--include-path", str(task_dir), "--limit", "4"]
    assert main(args) == 0
    assert "tm_even" in capsys.readouterr().out
    results = json.loads((saved_run / "eval" / "step_00000003-tasks-tm_even.json").read_text())
    (event,) = read_jsonl(saved_run / "metrics.jsonl", "eval_tasks")
    assert event["step"] == 3 and event["tm_even/acc"] == results["results"]["tm_even"]["acc,none"]
    before = {p: p.read_bytes() for p in saved_run.rglob("*") if p.is_file()}
    assert main(["eval", str(saved_run), "--tasks", "tm_even,no_such_task", "--include-path", str(task_dir)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "unknown lm-eval task no_such_task" in err[0]
    assert before == {p: p.read_bytes() for p in saved_run.rglob("*") if p.is_file()}

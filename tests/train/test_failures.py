"""A finished run keeps its work: no eval split, a failing eval or a failing sampler never cost the final
checkpoint; an interrupting Ctrl-C waits for the save in progress; a fresh run never continues a dead run's W&B run."""

from __future__ import annotations

import json
import os
import signal
import sys
import types

import pytest

from data_helpers import make_docs, write_jsonl
from tokenmill.checkpoint.find import find_checkpoint
from tokenmill.cli import main
from tokenmill.data.mixture import is_eval_doc
from tokenmill.parallel.engine import Engine
from tokenmill.train.loop import train
from train_helpers import checkpoints, cli_args, events, one_thread, tiny_config  # noqa: F401 (one_thread: autouse)


def assert_final_checkpoint(run_dir, steps: int) -> None:
    saved = checkpoints(run_dir)
    assert saved and saved[-1].name == f"step_{steps:08d}", saved
    assert json.loads((saved[-1] / "meta.json").read_text())["reason"] == "final"
    assert find_checkpoint(run_dir) == saved[-1]  # complete and verified


def train_only_source(tmp_path, fraction: float = 0.02):
    """A small JSONL source whose every document hashes into the train split at `fraction`."""
    docs = [d for d in make_docs(200, max_words=40) if not is_eval_doc(d, fraction)]
    return write_jsonl(tmp_path / "train_only.jsonl", docs)


@pytest.mark.parametrize("case", ["eval_fraction=0", "no eval document"])
def test_a_run_without_eval_split_skips_eval_with_one_warning_and_saves(tmp_path, capsys, case):
    data = (
        ["data.eval_fraction=0"]
        if case == "eval_fraction=0"
        else [f"data.sources=[{train_only_source(tmp_path)}]", "data.eval_fraction=0.02"]
    )
    result = train(tiny_config(tmp_path / "run", 4, *data, "eval.interval_steps=2"))
    assert result.status == "completed" and result.last_eval == {}
    warnings = events(result.run_dir, "warning")
    assert len(warnings) == 1 and warnings[0]["step"] == 0 and "evaluation is skipped" in warnings[0]["message"]
    expected = "eval_fraction is 0" if case == "eval_fraction=0" else "holds fewer than 1 windows"
    assert expected in warnings[0]["message"]
    assert not events(result.run_dir, "eval")
    assert events(result.run_dir, "sample")  # samples need no eval data
    assert_final_checkpoint(result.run_dir, 4)
    assert capsys.readouterr().out.count("evaluation is skipped") == 1


@pytest.mark.parametrize("broken", ["run_eval", "write_samples"])
def test_a_failing_eval_or_sampler_never_costs_the_final_checkpoint(tmp_path, monkeypatch, broken):
    from tokenmill.train import loop

    def fail(*args, **kwargs):
        raise RuntimeError(f"{broken} exploded")

    monkeypatch.setattr(loop, broken, fail)
    result = train(tiny_config(tmp_path / "run", 4, "eval.interval_steps=2", "checkpoint.interval_steps=2"))
    assert result.status == "completed" and result.state.step == 4
    messages = [e["message"] for e in events(result.run_dir, "warning")]
    assert messages and all(f"{broken} exploded" in m for m in messages)
    assert len(messages) == (2 if broken == "run_eval" else 1)  # the step-2 eval and the final one; one sampling
    assert_final_checkpoint(result.run_dir, 4)
    assert [e["step"] for e in events(result.run_dir, "checkpoint")] == [2, 4]


def test_interrupting_ctrl_c_inside_a_save_lets_it_complete_then_stops(tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 3 asks for a stop (a checkpoint); the second (abort) and third (interrupt at once) land
    while that checkpoint is being written: the save completes, then the run stops (exit 130); the checkpoint is
    complete and the run resumes from it."""
    from tokenmill.checkpoint import weights

    real_fb, real_write = Engine.forward_backward, weights.write_safetensors
    calls = {"micro": 0}

    def first_ctrl_c(self, *args, **kwargs):
        calls["micro"] += 1
        if calls["micro"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_fb(self, *args, **kwargs)

    def second_ctrl_c(handle, tensors, metadata):
        for _ in range(2):  # land in the middle of writing the weights
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(handle, tensors, metadata)

    monkeypatch.setattr(Engine, "forward_backward", first_ctrl_c)
    monkeypatch.setattr(weights, "write_safetensors", second_ctrl_c)
    run_dir = tmp_path / "run"
    args = cli_args(run_dir, 6)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err
    saved = checkpoints(run_dir)
    assert [p.name for p in saved] == ["step_00000003"]
    assert json.loads((saved[0] / "meta.json").read_text())["reason"] == "stop"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert events(run_dir, "summary")[-1]["status"] == "interrupted"
    assert [(e["step"], e["reason"]) for e in events(run_dir, "checkpoint")] == [(3, "stop")]

    monkeypatch.setattr(Engine, "forward_backward", real_fb)
    monkeypatch.setattr(weights, "write_safetensors", real_write)
    assert main([*args, "--resume"]) == 0
    assert [e["step"] for e in events(run_dir, "resume")] == [3]
    assert_final_checkpoint(run_dir, 6)


def test_a_fresh_run_starts_a_new_wandb_run(tmp_path, monkeypatch):
    """A run killed before its first checkpoint leaves wandb_id.txt behind; the next fresh run in that folder must
    not continue that dead W&B run (it would, if the sinks took the fresh run for a resume at step 0)."""
    started = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.config = types.SimpleNamespace(update=lambda *a, **k: None)
            self.summary = {}

        def log(self, data, step):
            pass

        def finish(self):
            pass

    monkeypatch.setitem(
        sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: started.append(FakeRun(**kw)) or started[-1])
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text("deadrun00000\n")
    cfg = tiny_config(run_dir, 2, "log.wandb=offline")
    assert train(cfg).status == "completed"
    assert len(started) == 1 and started[0].kwargs["id"] != "deadrun00000"
    assert (run_dir / "wandb_id.txt").read_text().strip() == started[0].kwargs["id"]
    assert train(cfg, resume=True).status == "completed"  # a real resume continues this run's id
    assert started[1].kwargs["id"] == started[0].kwargs["id"]

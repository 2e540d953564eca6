"""Signals and requests through the real training loop, in process: SIGUSR1 saves and the run goes on, a second
Ctrl-C aborts without a checkpoint, and a request left over from before the run started is ignored."""

from __future__ import annotations

import json
import os
import signal

from tokenmill.jobs.actions import Action
from tokenmill.jobs.control import read_ack, write_request
from tokenmill.jobs.status import read_status
from tokenmill.parallel.engine import Engine
from tokenmill.train.loop import EXIT_ABORTED, train
from train_helpers import checkpoints, events, one_thread, tiny_config  # noqa: F401 (one_thread: autouse)

STEPS = 4


def signal_during_step(monkeypatch, step: int, *signals: signal.Signals) -> None:
    """Send this process `signals` during the forward-backward of optimizer step `step` (one micro-step each)."""
    real = Engine.forward_backward
    calls = {"n": 0}

    def forward_backward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "forward_backward", forward_backward)


def reasons(run_dir) -> list[tuple[int, str]]:
    return [(e["step"], e["reason"]) for e in events(run_dir, "checkpoint")]


def test_sigusr1_saves_now_and_training_continues(tmp_path, monkeypatch):
    signal_during_step(monkeypatch, 2, signal.SIGUSR1)
    result = train(tiny_config(tmp_path / "run", STEPS, "train.grad_accum=1"))
    assert (result.status, result.exit_code, result.state.step) == ("completed", 0, STEPS)
    assert reasons(result.run_dir) == [(2, "manual"), (STEPS, "final")]
    ack = read_ack(result.run_dir)
    assert (ack["action"], ack["step"], ack["requests"]) == ("save", 2, [])
    assert ack["checkpoint"] == str(checkpoints(result.run_dir)[0])


def test_second_ctrl_c_aborts_without_a_checkpoint(tmp_path, monkeypatch):
    signal_during_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    result = train(tiny_config(tmp_path / "run", STEPS, "train.grad_accum=1"))
    assert (result.status, result.exit_code, result.state.step) == ("aborted", EXIT_ABORTED, 2)
    assert checkpoints(result.run_dir) == [] and reasons(result.run_dir) == []
    assert events(result.run_dir, "summary")[-1]["status"] == "aborted"
    assert read_status(result.run_dir)["state"] == "aborted"
    assert (read_ack(result.run_dir)["action"], read_ack(result.run_dir)["checkpoint"]) == ("abort", None)


def test_an_abort_under_torchrun_restarts_exits_0_so_it_is_not_relaunched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")  # what torchrun --max-restarts=3 gives its workers
    signal_during_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    result = train(tiny_config(tmp_path / "run", STEPS, "train.grad_accum=1"))
    assert (result.status, result.exit_code, result.state.step) == ("aborted", 0, 2)
    assert events(result.run_dir, "summary")[-1]["status"] == "aborted"
    assert any("not 5" in e["message"] for e in events(result.run_dir, "warning"))


def test_a_request_from_before_the_run_started_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    stale = write_request(run_dir, Action.ABORT)  # e.g. sent to an earlier process that died before reading it
    result = train(tiny_config(run_dir, STEPS))
    assert (result.status, result.state.step) == ("completed", STEPS)
    assert read_ack(run_dir) is None
    assert not (run_dir / "control" / f"request-{stale['id']}.json").exists()  # taken away, not left to act later
    assert json.loads((run_dir / "control" / "status.json").read_text())["state"] == "completed"

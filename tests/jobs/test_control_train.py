"""Job control of real trainings: a `tokenmill train` child steered from this process with `tokenmill control`,
and a 2-process gloo run in which every rank acts on the same step.

- save: a manual checkpoint at the acknowledged step, training goes on, and a run resumed from that checkpoint
  equals the rest of the uninterrupted run bit for bit (losses, weights, optimizer, loader, RNG);
- stop: exit 0 with a checkpoint at the acknowledged step; abort: its own exit code, no checkpoint, `aborted`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.jobs.control import read_ack, write_request
from tokenmill.jobs.status import read_status
from tokenmill.train.loop import EXIT_ABORTED, train
from train_helpers import (  # one_thread: autouse fixture
    assert_checkpoints_equal,
    checkpoints,
    cli_args,
    events,
    one_thread,  # noqa: F401
    spawn_cli,
    tiny_config,
)

STEPS = 30
EXTRA = ("model.dropout=0.1",)  # randomness a resume must restore
# Slows each micro-step of the child by 60 ms (numerics untouched), so a request lands while it trains.
SLOW_STEPS = """
import time
from tokenmill.parallel.engine import Engine
_real = Engine.forward_backward
def _slow(self, *args, **kwargs):
    time.sleep(0.06)
    return _real(self, *args, **kwargs)
Engine.forward_backward = _slow
"""

pytestmark = pytest.mark.slow


def start_training(run_dir: Path):
    """A `tokenmill train` child; returns once its heartbeat shows it past step 2."""
    child = spawn_cli(cli_args(run_dir, STEPS, *EXTRA), SLOW_STEPS)
    deadline = time.monotonic() + 180
    while not ((status := read_status(run_dir)) and status["step"] >= 2):
        if child.poll() is not None:
            pytest.fail(f"training ended (rc {child.returncode}) before step 2:\n{child.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("training did not reach step 2 within 180 s")
        time.sleep(0.05)
    return child


def finish(child) -> str:
    try:
        out, _ = child.communicate(timeout=180)
    except BaseException:
        child.kill()
        raise
    return out


def reason(checkpoint: str | Path) -> str:
    return json.loads((Path(checkpoint) / "meta.json").read_text())["reason"]


def test_save_checkpoints_and_training_continues_and_resume_equals_the_run(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "live"
    child = start_training(run_dir)
    try:
        assert main(["control", "list", str(tmp_path / "runs")]) == 0
        (row,) = capsys.readouterr().out.strip().splitlines()[1:]
        assert row.split()[:2] == [str(run_dir), "alive"]
        assert main(["control", "save", str(run_dir), "--wait", "120"]) == 0
        assert "done: save at step" in capsys.readouterr().out
    finally:
        out = finish(child)
    assert child.returncode == 0, out[-3000:]
    ack = read_ack(run_dir)
    saved_step = ack["step"]
    assert ack["action"] == "save" and 2 <= saved_step < STEPS
    assert [p.name for p in checkpoints(run_dir)] == [f"step_{saved_step:08d}", f"step_{STEPS:08d}"]
    assert ack["checkpoint"] == str(checkpoints(run_dir)[0]) and reason(ack["checkpoint"]) == "manual"
    assert events(run_dir, "summary")[-1]["status"] == "completed"
    assert read_status(run_dir)["state"] == "completed"

    resumed = train(tiny_config(tmp_path / "resumed", STEPS, *EXTRA), resume=ack["checkpoint"])
    rest = [e["loss"] for e in events(run_dir, "train") if e["step"] > saved_step]
    assert resumed.losses == rest  # bitwise: Python floats through JSON round-trip exactly
    assert_checkpoints_equal(checkpoints(resumed.run_dir)[-1], checkpoints(run_dir)[-1])


def test_stop_saves_and_exits_0(tmp_path, capsys):
    run_dir = tmp_path / "run"
    child = start_training(run_dir)
    try:
        assert main(["control", "stop", str(run_dir), "--wait", "120"]) == 0
    finally:
        out = finish(child)
    assert child.returncode == 0, out[-3000:]
    ack = read_ack(run_dir)
    assert ack["action"] == "stop" and ack["step"] < STEPS
    (saved,) = checkpoints(run_dir)
    assert (saved.name, str(saved), reason(saved)) == (f"step_{ack['step']:08d}", ack["checkpoint"], "stop")
    assert events(run_dir, "summary")[-1]["status"] == "stopped"
    assert read_status(run_dir)["state"] == "stopped"
    capsys.readouterr()
    assert main(["control", "save", str(run_dir)]) == 2  # no longer running
    assert "ended (stopped)" in capsys.readouterr().err


def test_abort_exits_with_its_code_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    child = start_training(run_dir)
    try:
        assert main(["control", "abort", str(run_dir), "--wait", "120"]) == 0
    finally:
        out = finish(child)
    assert child.returncode == EXIT_ABORTED, out[-3000:]
    ack = read_ack(run_dir)
    assert (ack["action"], ack["checkpoint"]) == ("abort", None) and ack["step"] < STEPS
    assert checkpoints(run_dir) == []
    summary = events(run_dir, "summary")[-1]
    assert (summary["status"], summary["steps"]) == ("aborted", ack["step"])
    assert read_status(run_dir)["state"] == "aborted"


# ---- two ranks -------------------------------------------------------------------------------------------

SAVE_STEP, STOP_STEP = 3, 6


def steer_two_ranks(run_dir: str) -> dict:
    """One rank of a 2-process run: rank 1 alone gets SIGUSR1 during step SAVE_STEP, and rank 0 alone finds a stop
    request during step STOP_STEP. Returns what this rank did and when."""
    from tokenmill.jobs.actions import Action
    from tokenmill.jobs.control import JobControl
    from tokenmill.parallel.engine import Engine

    rank = int(os.environ["RANK"])
    calls, done = {"n": 0}, []
    real_forward_backward, real_done = Engine.forward_backward, JobControl.done

    def forward_backward(self, *args, **kwargs):
        calls["n"] += 1  # one micro-step per optimizer step (train.grad_accum=1): call n is step n
        if rank == 1 and calls["n"] == SAVE_STEP:
            os.kill(os.getpid(), signal.SIGUSR1)
        if rank == 0 and calls["n"] == STOP_STEP:
            write_request(run_dir, Action.STOP)
        return real_forward_backward(self, *args, **kwargs)

    def record(self, action, step, checkpoint=None):
        done.append((action.word, step))
        return real_done(self, action, step, checkpoint)

    Engine.forward_backward, JobControl.done = forward_backward, record
    result = train(tiny_config(run_dir, 4 * STOP_STEP, "parallel.strategy=ddp", "train.grad_accum=1"))
    return {"status": result.status, "step": result.state.step, "done": done}


def test_two_ranks_act_on_the_same_step(tmp_path):
    from dist_helpers import run_ranks

    run_dir = tmp_path / "run"
    ranks = run_ranks(steer_two_ranks, 2, str(run_dir), timeout=300)
    expected = {"status": "stopped", "step": STOP_STEP, "done": [("save", SAVE_STEP), ("stop", STOP_STEP)]}
    assert ranks == [expected, expected]
    assert [p.name for p in checkpoints(run_dir)] == [f"step_{SAVE_STEP:08d}", f"step_{STOP_STEP:08d}"]
    assert [reason(p) for p in checkpoints(run_dir)] == ["manual", "stop"]
    assert read_ack(run_dir)["action"] == "stop" and len(read_ack(run_dir)["requests"]) == 1

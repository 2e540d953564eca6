"""Exact resume (SPEC C5, user_needs "six tests" no. 1): a run stopped, killed or crashed mid-save and then
resumed equals the uninterrupted run bit for bit on CPU: every logged loss, the parameters, the optimizer,
scheduler, data-loader and RNG states.

Dropout is on and the shuffle buffer is used, so a resume that forgot the RNG or loader state diverges.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tokenmill.checkpoint.find import find_checkpoint
from tokenmill.cli import main
from tokenmill.parallel.engine import Engine
from tokenmill.train.loop import train
from train_helpers import (  # one_thread: autouse fixture
    assert_checkpoints_equal,
    checkpoints,
    cli_args,
    events,
    logged_curve,
    one_thread,  # noqa: F401
    spawn_cli,
    tiny_config,
)

N = 4  # steps per segment of the SIGTERM test
RESUME = ("model.dropout=0.1", f"eval.interval_steps={N}")  # randomness and mid-run evals that must line up
K = 8  # the kill tests: checkpoint every K steps of a 2K-step run
KILL = ("model.dropout=0.1", f"checkpoint.interval_steps={K}")


def sigterm_at_call(monkeypatch, call: int) -> None:
    """Send this process SIGTERM during the `call`-th micro-step of the next train() (a stop request)."""
    real = Engine.forward_backward
    seen = {"n": 0}

    def forward_backward(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "forward_backward", forward_backward)


def final_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]


def test_stop_resume_stop_resume_equals_straight_run(tmp_path, monkeypatch):
    straight = train(tiny_config(tmp_path / "straight", 3 * N, *RESUME))
    assert straight.status == "completed" and len(straight.losses) == 3 * N

    run_dir = tmp_path / "split"
    cfg = tiny_config(run_dir, 3 * N, *RESUME)
    parts = []
    for segment in range(2):  # stop at N, resume and stop at 2N: a resume of a resumed run
        with monkeypatch.context() as patch:
            sigterm_at_call(patch, N)
            part = train(cfg, resume=True if segment else None)
        assert (part.status, part.exit_code, part.state.step) == ("stopped", 0, (segment + 1) * N)
        saved = checkpoints(run_dir)[-1]
        assert saved.name == f"step_{(segment + 1) * N:08d}"
        assert '"reason": "stop"' in (saved / "meta.json").read_text()
        parts.append(part)
    last = train(cfg, resume=True)
    assert last.status == "completed"

    assert parts[0].losses + parts[1].losses + last.losses == straight.losses  # bitwise (Python floats)
    assert logged_curve(run_dir) == logged_curve(straight.run_dir)  # loss, grad norm, lr of every step
    assert [e["loss"] for e in events(run_dir, "eval")] == [e["loss"] for e in events(straight.run_dir, "eval")]
    assert [e["step"] for e in events(run_dir, "resume")] == [N, 2 * N]
    assert (last.state.step, last.state.tokens_seen) == (straight.state.step, straight.state.tokens_seen)
    assert last.state.best_eval_loss == straight.state.best_eval_loss
    assert_checkpoints_equal(final_checkpoint(run_dir), final_checkpoint(straight.run_dir))


@pytest.fixture(scope="module")
def straight_2k(tmp_path_factory):
    """The uninterrupted reference of the kill tests (same config as their children)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(tiny_config(tmp_path_factory.mktemp("straight") / "run", 2 * K, *KILL))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "completed"
    return result


def wait_for(path: Path, child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            pytest.fail(f"child ended (rc {child.returncode}) before {path} appeared:\n{child.stdout.read()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


# Slows each micro-step of the child by 60 ms (numerics untouched), so the kill lands inside the run.
SLOW_STEPS = """
import time
from tokenmill.parallel.engine import Engine
_real = Engine.forward_backward
def _slow(self, *args, **kwargs):
    time.sleep(0.06)
    return _real(self, *args, **kwargs)
Engine.forward_backward = _slow
"""


def test_sigkill_at_random_moment_then_resume_equals_straight_run(tmp_path, straight_2k):
    run_dir = tmp_path / "run"
    args = cli_args(run_dir, 2 * K, *KILL)
    child = spawn_cli(args, SLOW_STEPS)
    wait_for(run_dir / "checkpoints" / f"step_{K:08d}" / "manifest.json", child)
    delay = random.SystemRandom().uniform(0.0, 0.25)  # the remaining K steps take >= 0.48 s; train() reseeds
    # the global `random`, hence a private generator
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (
        f"child ended by itself (rc {child.returncode}) before the kill at +{delay:.3f} s"
    )

    assert main([*args, "--resume"]) == 0
    assert logged_curve(run_dir) == logged_curve(straight_2k.run_dir), f"killed at +{delay:.3f} s"
    assert_checkpoints_equal(final_checkpoint(run_dir), final_checkpoint(straight_2k.run_dir))


# Dies in the middle of writing the second checkpoint's weights (the final one at step 2K).
DIE_IN_SECOND_SAVE = """
import io, os, signal
import tokenmill.checkpoint.weights as _ck
_real = _ck.write_safetensors
_calls = [0]
def _dying(handle, tensors, metadata):
    _calls[0] += 1
    if _calls[0] < 2:
        return _real(handle, tensors, metadata)
    buffer = io.BytesIO()
    _real(buffer, tensors, metadata)
    data = buffer.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
_ck.write_safetensors = _dying
"""


def test_kill_during_checkpoint_write_keeps_previous_and_resume_picks_it(tmp_path, straight_2k):
    run_dir = tmp_path / "run"
    args = cli_args(run_dir, 2 * K, *KILL)
    child = spawn_cli(args, DIE_IN_SECOND_SAVE)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, out

    folder = run_dir / "checkpoints"
    partial = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert partial == [f".tmp-step_{2 * K:08d}"], sorted(p.name for p in folder.iterdir())
    assert [p.name for p in checkpoints(run_dir)] == [f"step_{K:08d}"]
    assert find_checkpoint(run_dir) == folder / f"step_{K:08d}"  # verified deeply: intact

    assert main([*args, "--resume"]) == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert logged_curve(run_dir) == logged_curve(straight_2k.run_dir)
    assert_checkpoints_equal(final_checkpoint(run_dir), final_checkpoint(straight_2k.run_dir))

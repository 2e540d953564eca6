"""The heartbeat: what StatusSink writes for each event, and how a reader judges liveness (pid on this host,
heartbeat age elsewhere) and finds run folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil

from tokenmill.jobs.status import (
    ALIVE,
    DEAD,
    UNKNOWN,
    StatusSink,
    eta_now,
    find_runs,
    liveness,
    process_alive,
    read_status,
)


def test_heartbeat_follows_the_runs_events(tmp_path):
    sink = StatusSink(tmp_path, started_at=123.0, total_steps=10)
    sink.log(0, {"model": {}}, kind="startup")
    first = read_status(tmp_path)
    assert (first["state"], first["step"], first["pid"], first["host"]) == (
        "running",
        0,
        os.getpid(),
        socket.gethostname(),
    )
    assert (first["started_at"], first["total_steps"], first["loss"]) == (123.0, 10, None)

    sink.log(2, {"loss": 3.5, "lr": 1e-3, "tokens_seen": 256, "tokens_per_s": 1000.0, "eta_s": 8.0, "ppl": 33.1})
    sink.log(4, {"loss": float("nan"), "lr": 1e-3, "tokens_seen": 512, "tokens_per_s": 900.0, "eta_s": 6.0})
    sink.log(4, {"path": "run/checkpoints/step_00000004", "reason": "manual"}, kind="checkpoint")
    sink.log(4, {"loss": 3.0}, kind="eval")  # not a heartbeat event: ignored
    now = read_status(tmp_path)
    assert (now["step"], now["tokens_seen"], now["tokens_per_s"], now["eta_s"]) == (4, 512, 900.0, 6.0)
    assert now["loss"] is None  # NaN is not JSON
    assert now["last_checkpoint"] == "run/checkpoints/step_00000004"
    assert now["heartbeat_s"] is not None and now["heartbeat_s"] >= 0
    assert "ppl" not in now

    sink.log(4, {"status": "aborted", "steps": 4, "tokens_seen": 512, "final_loss": 3.25}, kind="summary")
    final = read_status(tmp_path)
    assert (final["state"], final["loss"], final["tokens_seen"]) == ("aborted", 3.25, 512)
    assert liveness(read_status(tmp_path)) == "aborted"


def test_this_process_is_alive_and_a_finished_one_is_dead(tmp_path):
    sink = StatusSink(tmp_path)
    sink.log(0, {}, kind="startup")
    assert liveness(read_status(tmp_path)) == ALIVE

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {**read_status(tmp_path), "pid": int(child.stdout)}
    assert liveness(gone) == DEAD


def test_a_recycled_pid_is_not_the_run():
    """A process with the run's pid but another creation time (the pid was reused) does not count."""
    me = os.getpid()
    created = psutil.Process().create_time()
    assert process_alive(me, created)
    assert not process_alive(me, created - 3600)


def test_a_remote_run_is_alive_only_while_its_heartbeat_is_fresh():
    now = time.time()
    remote = {"state": "running", "host": "elsewhere.invalid", "pid": 1, "updated_at": now - 30, "heartbeat_s": 5.0}
    assert liveness(remote, now) == ALIVE
    assert liveness({**remote, "updated_at": now - 3600}, now) == UNKNOWN
    # a run that logs every 10 minutes is fresh for three of its intervals
    assert liveness({**remote, "updated_at": now - 1500, "heartbeat_s": 600.0}, now) == ALIVE


def test_eta_counts_down_from_the_last_heartbeat():
    status = {"eta_s": 100.0, "updated_at": 1000.0}
    assert eta_now(status, now=1030.0) == 70.0
    assert eta_now(status, now=2000.0) == 0.0
    assert eta_now({"eta_s": None, "updated_at": 1.0}) is None


def test_find_runs_looks_two_levels_down(tmp_path):
    for name in ("a", "team/b", "team/deep/c/d"):
        StatusSink(tmp_path / name).write()
    (tmp_path / "notes").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "team" / "b"]
    assert find_runs(tmp_path / "a") == [tmp_path / "a"]


def test_an_unreadable_heartbeat_is_no_heartbeat(tmp_path):
    assert read_status(tmp_path) is None
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "status.json").write_text("[1, 2")
    assert read_status(tmp_path) is None

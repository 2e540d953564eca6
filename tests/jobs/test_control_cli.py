"""`tokenmill control` without a training: the list and status views, bad input as one line with exit 2 (nothing
written), and start-up without torch. Liveness is decided from real processes: this test process (alive) and a
light child killed with SIGKILL (dead)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.jobs.status import StatusSink, read_status

# A process that writes a heartbeat the way the training loop does and then waits to be killed.
HEARTBEAT_CHILD = """
import sys, time
from tokenmill.jobs.status import StatusSink
sink = StatusSink(sys.argv[1], total_steps=100)
sink.log(0, {}, kind="startup")
sink.log(7, {"loss": 2.5, "lr": 1e-3, "tokens_seen": 7000, "tokens_per_s": 1234.0, "eta_s": 60.0})
print("ready", flush=True)
time.sleep(120)
"""


def tokenmill(*args: str) -> subprocess.CompletedProcess:
    """`python -m tokenmill ARGS` in a fresh interpreter (what a user runs from another terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def live_run(run_dir: Path, step: int = 5) -> StatusSink:
    """A heartbeat of this (alive) test process, as a training at `step` would write it."""
    sink = StatusSink(run_dir, total_steps=20)
    sink.log(step, {"loss": 1.25, "lr": 3e-4, "tokens_seen": 640, "tokens_per_s": 2500.0, "eta_s": 30.0})
    sink.log(step, {"path": f"{run_dir}/checkpoints/step_00000004", "reason": "interval"}, kind="checkpoint")
    return sink


def finished_run(run_dir: Path, state: str = "completed") -> None:
    live_run(run_dir, 20).log(20, {"status": state}, kind="summary")


def kill_a_run(run_dir: Path) -> Path:
    """Start a process that writes a heartbeat into `run_dir`, see it alive, and kill it (SIGKILL)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HEARTBEAT_CHILD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert main(["control", "status", str(run_dir)]) == 0  # alive while the process lives
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder of runs: `killed` (its process was killed), `done` (completed) and `plain` (a user's folder)."""
    root = tmp_path_factory.mktemp("runs")
    kill_a_run(root / "killed")
    finished_run(root / "done")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("mine\n")
    return root


def table(output: str) -> dict[str, list[str]]:
    """`control list` rows by run folder name: {name: [state, step, loss, tok/s, eta, checkpoint]}."""
    lines = output.strip().splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATE", "STEP"]
    return {Path(line.split()[0]).name: line.split()[1:] for line in lines[1:]}


def test_list_shows_live_dead_and_finished_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    kill_a_run(root / "killed")
    live_run(root / "live")
    finished_run(root / "team" / "done")
    (root / "not-a-run").mkdir()
    capsys.readouterr()
    assert main(["control", "list", str(root)]) == 0
    rows = table(capsys.readouterr().out)
    assert set(rows) == {"live", "killed", "done"}
    assert rows["live"][:4] == ["alive", "5/20", "1.2500", "2.5k"]
    assert rows["live"][-1].endswith("step_00000004")
    assert rows["killed"][:4] == ["dead", "7/100", "2.5000", "1.23k"]
    assert rows["killed"][4] == "-"  # no ETA for a dead run
    assert rows["done"][:2] == ["completed", "20/20"]


def test_list_json_and_status(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "live"
    live_run(run_dir)
    assert main(["control", "list", str(tmp_path / "runs"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["run"], row["liveness"], row["step"], row["pid"]) == (str(run_dir), "alive", 5, os.getpid())

    assert main(["control", "status", str(run_dir)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert lines["state"].startswith("alive (pid")
    assert (lines["step"], lines["loss"], lines["checkpoint"]) == (
        "5 / 20",
        "1.2500",
        f"{run_dir}/checkpoints/step_00000004",
    )
    assert main(["control", "status", str(run_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["liveness"] == "alive" and shown["ack"] is None


def test_list_of_a_folder_without_runs_says_so(tmp_path, capsys):
    assert main(["control", "list", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_save_on_a_live_run_drops_one_request(tmp_path, capsys):
    run_dir = tmp_path / "live"
    live_run(run_dir)
    assert main(["control", "save", str(run_dir)]) == 0
    (request,) = (run_dir / "control").glob("request-*.json")
    assert json.loads(request.read_text())["action"] == "save"
    assert "asked" in capsys.readouterr().out


def test_wait_gives_up_after_its_timeout(tmp_path, capsys):
    run_dir = tmp_path / "live"
    live_run(run_dir)  # alive, but nothing reads its requests
    started = time.monotonic()
    assert main(["control", "stop", str(run_dir), "--wait", "0.5"]) == 1
    assert time.monotonic() - started < 10
    assert "no acknowledgement" in capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUT = {
    "unknown-action": (["control", "frobnicate", "{runs}"], "unknown action 'frobnicate'"),
    "no-action": (["control"], "no action"),
    "status-without-run": (["control", "status"], "needs a run folder"),
    "not-a-run": (["control", "status", "{runs}/plain"], "is not a run folder"),
    "missing-folder": (["control", "save", "{runs}/nowhere"], "is not a folder"),
    "list-of-a-file": (["control", "list", "{runs}/plain/notes.txt"], "is not a folder"),
    "save-a-killed-run": (["control", "save", "{runs}/killed"], "is not running"),
    "stop-a-finished-run": (["control", "stop", "{runs}/done"], "ended (completed)"),
    "abort-a-killed-run-forced": (["control", "abort", "{runs}/killed", "--force"], "is not running"),
    "bad-wait": (["control", "save", "{runs}/killed", "--wait", "soon"], "--wait 'soon'"),
    "option-of-another-action": (["control", "list", "{runs}", "--force"], "--force does not apply"),
}


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, argv, message):
    before = snapshot(runs)
    proc = tokenmill(*(arg.format(runs=runs) for arg in argv))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(runs) == before


LOADED = "loaded module: "


@pytest.mark.parametrize("action", ["list", "status", "save"])
def test_control_starts_without_torch(tmp_path, action):
    """`python -X importtime -m tokenmill control ...`: no torch module among the imports (a training keeps the
    machine busy; the command must answer at once)."""
    run_dir = tmp_path / "live"
    live_run(run_dir)
    target = str(tmp_path) if action == "list" else str(run_dir)
    code = (
        f"import atexit, runpy, sys; atexit.register(lambda: print(*('{LOADED}' + m for m in sys.modules), "
        f"sep='\\n')); sys.argv = ['tokenmill', 'control', {action!r}, {target!r}]; "
        f"runpy.run_module('tokenmill', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    loaded = {line[len(LOADED) :] for line in proc.stdout.splitlines() if line.startswith(LOADED)}
    modules = reported | loaded
    assert "tokenmill.cli.control" in modules and "tokenmill.jobs.status" in modules
    assert not sorted(m for m in modules if m == "torch" or m.startswith("torch.")), sorted(modules)[:20]
    assert read_status(run_dir)["state"] == "running"

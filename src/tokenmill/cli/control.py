"""`tokenmill control list [ROOT] | status RUN | save|stop|abort RUN`: see and steer running trainings.

There is no network listener: a request is a file dropped into `RUN/control/` that the run's rank 0 reads at its
next step boundary, and what a run is doing comes from its heartbeat, `RUN/control/status.json`. Nothing here
imports torch, so the command answers at once while a training keeps the machine busy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError

DEFAULT_ROOT = "runs"
ACTIONS = ("list", "status", "save", "stop", "abort")
SENDS = ("save", "stop", "abort")
OPTION_ACTIONS = {"json": ("list", "status"), "wait": SENDS, "force": SENDS}  # which actions take each option
WAIT_POLL_S = 0.2
COLUMNS = ("RUN", "STATE", "STEP", "LOSS", "TOK/S", "ETA", "LAST CHECKPOINT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        metavar="ACTION",
        help="list (runs under ROOT), status (one run), save (checkpoint now, training continues), "
        "stop (checkpoint, then exit), abort (exit without a checkpoint)",
    )
    parser.add_argument(
        "target",
        nargs="?",
        metavar="RUN|ROOT",
        help=f"the run folder (train.out_dir); for list, the folder holding runs (default {DEFAULT_ROOT})",
    )
    parser.add_argument("--json", action="store_true", help="list, status: print JSON instead of a table")
    parser.add_argument(
        "--wait",
        default=None,
        metavar="S",
        help="save, stop, abort: wait up to S seconds for the run to say it is done",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="save, stop, abort: send even when the run's liveness is unknown (another host, no recent heartbeat)",
    )


def run(args: argparse.Namespace) -> int:
    action = args.action
    if action not in ACTIONS:
        given = "no action" if action is None else f"unknown action {action!r}"
        raise UserError(f"tokenmill control: {given}; use list [ROOT], status RUN, save RUN, stop RUN or abort RUN")
    for option, allowed in OPTION_ACTIONS.items():
        if getattr(args, option) not in (None, False) and action not in allowed:
            raise UserError(f"--{option} does not apply to `control {action}`; it is for {', '.join(allowed)}")
    if action == "list":
        return list_runs(Path(args.target or DEFAULT_ROOT), args.json)
    if args.target is None:
        raise UserError(f"tokenmill control {action} needs a run folder: tokenmill control {action} runs/NAME")
    run_dir = Path(args.target)
    status = require_run(run_dir)
    if action == "status":
        return show_status(run_dir, status, args.json)
    return send(run_dir, status, action, parse_wait(args.wait), args.force)


def require_run(run_dir: Path) -> dict[str, Any]:
    """The run's heartbeat, or a one-line error saying why `run_dir` is not a run."""
    from tokenmill.jobs.status import read_status

    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is not a folder: give a run folder (a train.out_dir); `tokenmill control list` "
            f"shows the runs under {DEFAULT_ROOT}/"
        )
    status = read_status(run_dir)
    if status is None:
        raise UserError(
            f"{run_dir} is not a run folder: it has no readable control/status.json, which "
            f"`tokenmill train` writes into train.out_dir; `tokenmill control list` shows the runs"
        )
    return status


def parse_wait(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise UserError(f"--wait {value!r} is not a number of seconds: give e.g. --wait 60")
    return seconds


# ---- list and status ---------------------------------------------------------------------------------


def list_runs(root: Path, as_json: bool) -> int:
    from tokenmill.jobs.status import find_runs, liveness, read_status

    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds your runs (default {DEFAULT_ROOT})")
    now = time.time()
    rows = []
    for run_dir in find_runs(root):
        status = read_status(run_dir)
        if status is not None:
            rows.append({"run": str(run_dir), "liveness": liveness(status, now), **status})
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs under {root} (a run folder holds control/status.json)")
    else:
        print_table([table_row(row, now) for row in rows])
    return 0


def table_row(row: dict[str, Any], now: float) -> list[str]:
    from tokenmill.jobs.status import ALIVE
    from tokenmill.metrics.sinks import human

    total = row.get("total_steps")
    alive = row["liveness"] == ALIVE
    return [
        row["run"],
        row["liveness"],
        f"{row.get('step')}/{total}" if total else str(row.get("step")),
        "-" if row.get("loss") is None else f"{row['loss']:.4f}",
        "-" if row.get("tokens_per_s") is None else human(row["tokens_per_s"]),
        show_eta(row, now) if alive else "-",
        row.get("last_checkpoint") or "-",
    ]


def show_eta(status: dict[str, Any], now: float) -> str:
    from tokenmill.jobs.status import eta_now
    from tokenmill.metrics.sinks import duration

    eta = eta_now(status, now)
    return "-" if eta is None else duration(eta)


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(cells[i]) for cells in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    for cells in [list(COLUMNS), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())


def show_status(run_dir: Path, status: dict[str, Any], as_json: bool) -> int:
    from tokenmill.jobs.control import read_ack
    from tokenmill.jobs.status import ALIVE, liveness
    from tokenmill.metrics.sinks import duration, human

    now = time.time()
    state, ack = liveness(status, now), read_ack(run_dir, since=status.get("started_at"))
    if as_json:
        print(json.dumps({"run": str(run_dir), "liveness": state, **status, "ack": ack}, indent=2))
        return 0
    total = status.get("total_steps")
    lines = {
        "run": str(run_dir),
        "state": f"{state} (pid {status.get('pid')} on {status.get('host')})",
        "step": f"{status.get('step')} / {total}" if total else str(status.get("step")),
        "tokens": human(status["tokens_seen"]) if status.get("tokens_seen") is not None else "-",
        "loss": f"{status['loss']:.4f}" if status.get("loss") is not None else "-",
        "lr": f"{status['lr']:.3e}" if status.get("lr") is not None else "-",
        "tokens/s": human(status["tokens_per_s"]) if status.get("tokens_per_s") is not None else "-",
        "eta": show_eta(status, now) if state == ALIVE else "-",
        "heartbeat": f"{duration(now - float(status.get('updated_at') or now))} ago",
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(status.get("started_at") or 0))),
        "checkpoint": status.get("last_checkpoint") or "-",
        "last action": describe_ack(ack) if ack else "-",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key.ljust(width)}  {value}")
    return 0


def describe_ack(ack: dict[str, Any]) -> str:
    where = f" -> {ack['checkpoint']}" if ack.get("checkpoint") else ""
    return f"{ack.get('action')} at step {ack.get('step')}{where}"


# ---- save, stop, abort -------------------------------------------------------------------------------


def send(run_dir: Path, status: dict[str, Any], action: str, wait_s: float, force: bool) -> int:
    """Drop the request if the run can read it; with `wait_s`, wait for its acknowledgement."""
    from tokenmill.jobs.actions import REQUESTS
    from tokenmill.jobs.control import write_request
    from tokenmill.jobs.status import ALIVE, UNKNOWN, liveness

    state = liveness(status)
    if state != ALIVE and not (force and state == UNKNOWN):
        raise UserError(not_alive(run_dir, status, state, action))
    request = write_request(run_dir, REQUESTS[action])
    print(f"asked {run_dir} to {action} (request {request['id']}); its rank 0 acts at the next step boundary")
    return wait_for_ack(run_dir, request["id"], wait_s) if wait_s else 0


def not_alive(run_dir: Path, status: dict[str, Any], state: str, action: str) -> str:
    from tokenmill.jobs.status import DEAD, UNKNOWN
    from tokenmill.metrics.sinks import duration

    where = f"process {status.get('pid')} on {status.get('host')}"
    if state == DEAD:
        return (
            f"{run_dir} is not running: its {where} is gone (last heartbeat at step {status.get('step')}); "
            f"resume it with `tokenmill train ... --resume`, then ask again"
        )
    if state == UNKNOWN:
        age = duration(time.time() - float(status.get("updated_at") or 0))
        return (
            f"cannot tell whether {run_dir} is alive: it runs as {where} and its last heartbeat is {age} old; "
            f"pass --force to send the {action} request anyway"
        )
    return f"{run_dir} is not running: it ended ({state}) at step {status.get('step')}; there is nothing to {action}"


def wait_for_ack(run_dir: Path, request_id: str, wait_s: float) -> int:
    """Print the run's acknowledgement of `request_id`; exit 1 when it ends or `wait_s` passes without one."""
    from tokenmill.jobs.control import read_ack
    from tokenmill.jobs.status import ALIVE, UNKNOWN, liveness, read_status

    deadline = time.monotonic() + wait_s
    while True:
        status = read_status(run_dir)  # read before the ack: a run acknowledges what it did before it ends
        state = liveness(status) if status is not None else "no status"
        ack = read_ack(run_dir)
        if ack and request_id in ack.get("requests", []):
            print(f"done: {describe_ack(ack)}")
            return 0
        if state not in (ALIVE, UNKNOWN):
            print(f"error: {run_dir} ended ({state}) before acting on the request", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            print(
                f"error: no acknowledgement from {run_dir} within {wait_s:g} s; `tokenmill control status "
                f"{run_dir}` shows whether it is still training",
                file=sys.stderr,
            )
            return 1
        time.sleep(WAIT_POLL_S)

"""Requests into a running training (save now, stop, abort), the acknowledgement of what was done, and
`JobControl`, the check the training loop makes at each step boundary.

No network listener: `tokenmill control save|stop|abort RUN` writes `RUN/control/request-<ns>-<pid>.json` under a
temporary name and renames it, so a reader never sees half a request; this works on shared filesystems and under
any scheduler. Rank 0 polls the folder at each step boundary (a `stat`; the folder is listed only when it changed)
and signals feed the same codes (jobs/signals.py). The loop reduces the code with MAX over ranks in the step's
all-ranks check, so every rank acts on the same step, and rank 0 then records what was done in
`RUN/control/ack.json`. Requests written before the run started are left over from an earlier process: ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenmill.checkpoint.folder import TMP_PREFIX, atomic_write_json
from tokenmill.jobs.actions import REQUESTS, Action
from tokenmill.jobs.signals import SignalRequests

CONTROL_DIR = "control"
REQUEST_PREFIX = "request-"
ACK_NAME = "ack.json"
STATUS_NAME = "status.json"  # the heartbeat (jobs/status.py)
# What job control writes under a run's out_dir (train/run_dir.py removes exactly these on --overwrite), with the
# temporary names of atomic writes
OUTPUTS = tuple(
    f"{CONTROL_DIR}/{prefix}{name}"
    for prefix in ("", TMP_PREFIX)
    for name in (f"{REQUEST_PREFIX}*.json", ACK_NAME, STATUS_NAME)
)
# A folder changed this recently is listed again even if its mtime looks unchanged: filesystems with coarse
# timestamps (1-2 s) give two changes in the same tick the same mtime.
RECENT_NS = 2_000_000_000


def control_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONTROL_DIR


def write_request(run_dir: str | Path, action: Action) -> dict[str, Any]:
    """Drop a request for `action` into the run's control folder (atomically); returns the request."""
    folder = control_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    now_ns = time.time_ns()
    request = {
        "id": f"{now_ns}-{os.getpid()}",
        "action": action.word,
        "time": now_ns / 1e9,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    atomic_write_json(folder / f"{REQUEST_PREFIX}{request['id']}.json", request)
    return request


def read_request(path: Path) -> dict[str, Any] | None:
    """A request file's content, or None when it is not one (unreadable, or an unknown action)."""
    try:
        request = json.loads(path.read_text(encoding="utf-8"))
        if request["action"] in REQUESTS and isinstance(request["time"], (int, float)):
            return request
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_ack(
    run_dir: str | Path, action: Action, step: int, checkpoint: str | Path | None, requests: list[str]
) -> dict[str, Any]:
    """Record that `action` was carried out at `step` (rank 0), answering the request ids in `requests`."""
    ack = {
        "action": action.word,
        "step": step,
        "time": time.time(),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "requests": requests,
    }
    control_dir(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(control_dir(run_dir) / ACK_NAME, ack)
    return ack


def read_ack(run_dir: str | Path, since: float | None = None) -> dict[str, Any] | None:
    """The last acknowledgement of a run, or None when there is none (or none written after `since`: an
    earlier process in the same folder wrote it)."""
    try:
        ack = json.loads((control_dir(run_dir) / ACK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(ack, dict) or (since is not None and float(ack.get("time") or 0) < since):
        return None
    return ack


class RequestPoller:
    """Rank 0's side of the channel: the requests that arrived since the run started, each taken once."""

    def __init__(self, run_dir: str | Path, started_at: float) -> None:
        self.folder = control_dir(run_dir)
        self.started_at = started_at
        self.taken: list[str] = []  # ids of requests taken since the last acknowledgement
        self._seen_mtime: int | None = None

    def poll(self) -> Action:
        """The highest action requested since the last poll; request files are removed once read."""
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return Action.NONE
        if mtime == self._seen_mtime and time.time_ns() - mtime > RECENT_NS:
            return Action.NONE
        self._seen_mtime = mtime
        wanted = Action.NONE
        for path in sorted(self.folder.glob(f"{REQUEST_PREFIX}*.json")):
            request = read_request(path)
            path.unlink(missing_ok=True)  # taken, stale or not a request: never read twice
            if request is not None and request["time"] >= self.started_at:
                self.taken.append(str(request.get("id", path.stem)))
                wanted = max(wanted, REQUESTS[request["action"]])
        return wanted


class JobControl:
    """The loop's step-boundary check: this process's signals and, on rank 0, the request files, as one code."""

    def __init__(self, run_dir: str | Path, started_at: float, is_main: bool) -> None:
        self.run_dir = Path(run_dir)
        self.signals = SignalRequests()
        self.poller = RequestPoller(run_dir, started_at) if is_main else None

    def requested(self) -> Action:
        """What this process asks for at this step boundary (the loop reduces it with MAX over ranks)."""
        return max(self.signals.action, self.poller.poll() if self.poller is not None else Action.NONE)

    def done(self, action: Action, step: int, checkpoint: str | Path | None = None) -> None:
        """`action` was carried out on every rank at `step`: forget what it answered; rank 0 acknowledges it."""
        self.signals.clear(action)
        if self.poller is not None:
            write_ack(self.run_dir, action, step, checkpoint, self.poller.taken)
            self.poller.taken = []

    def carry_out(
        self,
        step: int,
        agree: Callable[[int], int],
        save: Callable[[str], object],
        saved: bool,
        last_checkpoint: Callable[[], str | Path | None],
    ) -> Action:
        """Answer the strongest request of any rank at this step boundary and return it for the loop to act on.

        `agree` reduces this process's request with MAX over ranks (so every rank takes the same decision);
        SAVE and STOP save first (reason "manual" / "stop") unless this step already saved; ABORT saves nothing.
        The loop then breaks on STOP (status "stopped") and ABORT (status "aborted") and goes on otherwise.
        """
        action = Action(agree(int(self.requested())))
        if action == Action.ABORT:
            self.done(action, step)
        elif action != Action.NONE:
            if not saved:
                save("manual" if action == Action.SAVE else "stop")
            self.done(action, step, last_checkpoint())
        return action

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A checkpoint save: a Ctrl-C that would interrupt at once waits until the block has finished."""
        with self.signals.protect():
            yield

    def close(self) -> None:
        self.signals.restore()

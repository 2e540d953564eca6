"""The request channel and the signal codes, without a training: a request is read once, stale ones are ignored,
the strongest request wins, the acknowledgement names what it answered, and signals map onto the same codes."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tokenmill.jobs.actions import Action
from tokenmill.jobs.control import ACK_NAME, JobControl, RequestPoller, control_dir, read_ack, write_ack, write_request
from tokenmill.jobs.signals import SignalRequests


def test_codes_are_ordered_so_that_max_picks_the_strongest():
    assert Action.NONE < Action.SAVE < Action.STOP < Action.ABORT
    assert [a.word for a in Action] == ["none", "save", "stop", "abort"]


def test_a_request_is_taken_once_and_its_file_removed(tmp_path):
    poller = RequestPoller(tmp_path, started_at=time.time() - 1)
    assert poller.poll() == Action.NONE  # no control folder yet
    request = write_request(tmp_path, Action.SAVE)
    assert poller.poll() == Action.SAVE
    assert poller.taken == [request["id"]]
    assert not list(control_dir(tmp_path).glob("request-*"))
    assert poller.poll() == Action.NONE


def test_the_strongest_of_several_requests_wins(tmp_path):
    poller = RequestPoller(tmp_path, started_at=time.time() - 1)
    ids = [write_request(tmp_path, action)["id"] for action in (Action.SAVE, Action.ABORT, Action.STOP)]
    assert poller.poll() == Action.ABORT
    assert sorted(poller.taken) == sorted(ids)


def test_requests_older_than_the_run_are_ignored(tmp_path):
    write_request(tmp_path, Action.STOP)  # left over from an earlier process in this folder
    poller = RequestPoller(tmp_path, started_at=time.time() + 1)
    assert poller.poll() == Action.NONE
    assert poller.taken == []
    assert not list(control_dir(tmp_path).glob("request-*"))  # removed, so never read again


def test_a_file_that_is_not_a_request_is_ignored(tmp_path):
    folder = control_dir(tmp_path)
    folder.mkdir()
    (folder / "request-1-2.json").write_text('{"action": "explode", "time": 1e12}')
    (folder / "request-3-4.json").write_text("{not json")
    assert RequestPoller(tmp_path, started_at=0.0).poll() == Action.NONE


def test_a_request_in_the_same_mtime_tick_is_still_seen(tmp_path, monkeypatch):
    """A filesystem with coarse timestamps can give the folder the same mtime after a second change."""
    poller = RequestPoller(tmp_path, started_at=time.time() - 1)
    folder = control_dir(tmp_path)
    folder.mkdir()
    assert poller.poll() == Action.NONE
    stamp = os.stat(folder).st_mtime_ns
    write_request(tmp_path, Action.SAVE)
    os.utime(folder, ns=(stamp, stamp))  # as such a filesystem would leave it
    assert poller.poll() == Action.SAVE


def test_ack_records_action_step_checkpoint_and_requests(tmp_path):
    assert read_ack(tmp_path) is None
    write_ack(tmp_path, Action.SAVE, 7, tmp_path / "checkpoints" / "step_00000007", ["1-2"])
    ack = read_ack(tmp_path)
    assert (ack["action"], ack["step"], ack["requests"]) == ("save", 7, ["1-2"])
    assert ack["checkpoint"].endswith("step_00000007")
    assert json.loads((control_dir(tmp_path) / ACK_NAME).read_text()) == ack
    assert read_ack(tmp_path, since=ack["time"]) == ack
    assert read_ack(tmp_path, since=ack["time"] + 1) is None  # an earlier process's acknowledgement


@pytest.fixture
def signals():
    handler = SignalRequests()
    yield handler
    handler.restore()


def test_signals_map_onto_codes(signals):
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.action == Action.SAVE
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.action == Action.STOP
    signals.clear(Action.SAVE)  # a save does not answer a pending stop
    assert signals.action == Action.STOP
    signals.clear(Action.STOP)
    assert signals.action == Action.NONE


def test_ctrl_c_stops_then_aborts_then_interrupts(signals):
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.action == Action.STOP
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.action == Action.ABORT
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupting_ctrl_c_waits_for_a_protected_save(signals):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt), signals.protect():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)  # the save goes on to the end
    assert finished == [True]


def test_restore_puts_the_previous_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    SignalRequests().restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_job_control_combines_signals_and_requests_and_acknowledges(tmp_path):
    control = JobControl(tmp_path, started_at=time.time() - 1, is_main=True)
    try:
        request = write_request(tmp_path, Action.SAVE)
        os.kill(os.getpid(), signal.SIGTERM)
        assert control.requested() == Action.STOP
        control.done(Action.STOP, 4, tmp_path / "ck")
        assert read_ack(tmp_path)["requests"] == [request["id"]]
        assert control.requested() == Action.NONE
    finally:
        control.close()


def test_other_ranks_do_not_read_requests(tmp_path):
    control = JobControl(tmp_path, started_at=time.time() - 1, is_main=False)
    try:
        write_request(tmp_path, Action.ABORT)
        assert control.requested() == Action.NONE
        control.done(Action.ABORT, 1)
        assert read_ack(tmp_path) is None
    finally:
        control.close()


def test_overwrite_removes_the_previous_runs_control_files_and_nothing_else(tmp_path):
    from tokenmill.jobs.status import StatusSink
    from tokenmill.train.run_dir import prepare_run_dir

    StatusSink(tmp_path).write()
    write_ack(tmp_path, Action.STOP, 3, None, [])
    write_request(tmp_path, Action.SAVE)
    (control_dir(tmp_path) / "notes.txt").write_text("mine\n")
    prepare_run_dir(tmp_path, overwrite=True).commit()
    assert [p.name for p in control_dir(tmp_path).iterdir()] == ["notes.txt"]

"""The run folder: nothing is changed before set-up succeeds, `--overwrite` removes only what tokenmill wrote,
`--resume PATH` never silently replaces checkpoints, and an unusable out_dir is one line at set-up."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.cli import main
from tokenmill.errors import UserError
from tokenmill.train.run_dir import prepare_run_dir
from train_helpers import cli_args, one_thread  # noqa: F401 (one_thread: autouse fixture)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root, and every folder (so nothing added or removed goes unseen)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else ("dir", 0)
        )
    return out


def fake_run(root: Path, steps=(1, 2, 3), best: int | None = 2) -> Path:
    """A run folder as tokenmill leaves it (checkpoints, best.json, metrics, TensorBoard, W&B), plus a user's files."""
    import torch

    ck = Checkpointer(root, parts={"model": torch.nn.Linear(2, 2)})
    for step in steps:
        ck.save(step, eval_loss=1.0 if step == best else None)
    (root / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (root / "tb").mkdir()
    (root / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"events")
    (root / "wandb" / "offline-run-20240101_000000-abc").mkdir(parents=True)
    (root / "wandb" / "offline-run-20240101_000000-abc" / "run.wandb").write_bytes(b"w")
    (root / "wandb_id.txt").write_text("abc\n")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    # the user's own files inside tokenmill's folders
    (root / "checkpoints" / "my_model.pt").write_bytes(b"mine")
    (root / "tb" / "notes.txt").write_text("mine")
    (root / "wandb" / "settings").write_text("mine")
    (root / "README.md").write_text("mine")
    return root


USER_FILES = ("checkpoints/my_model.pt", "tb/notes.txt", "wandb/settings", "README.md", "tokenizer/tokenizer.json")


def test_fresh_run_changes_nothing_until_commit(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"}\n')  # a run killed before its first checkpoint
    run = prepare_run_dir(tmp_path)
    assert run.resume_from is None and (tmp_path / "metrics.jsonl").is_file()
    run.commit()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "metrics.1.jsonl").read_text() == '{"kind": "train"}\n'


def test_new_run_over_another_runs_checkpoints_is_refused(tmp_path):
    fake_run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"already holds another run's checkpoints .*--resume .*--overwrite"):
        prepare_run_dir(tmp_path)
    with pytest.raises(UserError, match="contradict"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_what_tokenmill_wrote_and_only_at_commit(tmp_path):
    fake_run(tmp_path)
    before = snapshot(tmp_path)
    assert prepare_run_dir(tmp_path, overwrite=True, is_main=False).remove == []  # only the main process acts
    run = prepare_run_dir(tmp_path, overwrite=True)
    assert snapshot(tmp_path) == before  # deciding changes nothing
    run.commit()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(USER_FILES)
    assert all((tmp_path / name).read_bytes() == (b"{}" if "tokenizer" in name else b"mine") for name in USER_FILES)
    fresh = tmp_path / "fresh"
    fake_run(fresh)
    for name in USER_FILES[:3]:
        (fresh / name).unlink()
    prepare_run_dir(fresh, overwrite=True).commit()
    assert sorted(p.name for p in fresh.iterdir()) == ["README.md", "tokenizer"]  # emptied writer folders go


def test_resume_latest_starts_fresh_when_nothing_was_saved(tmp_path):
    assert prepare_run_dir(tmp_path, resume=True).resume_from is None
    fake_run(tmp_path)
    assert prepare_run_dir(tmp_path, resume=True).resume_from.name == "step_00000003"


def test_resume_of_an_older_step_names_the_checkpoints_it_would_replace(tmp_path):
    fake_run(tmp_path, best=3)
    before = snapshot(tmp_path)
    older = tmp_path / "checkpoints" / "step_00000001"
    with pytest.raises(UserError) as err:
        prepare_run_dir(tmp_path, resume=str(older))
    assert "step_00000002, step_00000003" in str(err.value) and "--overwrite" in str(err.value)
    assert snapshot(tmp_path) == before
    run = prepare_run_dir(tmp_path, resume=str(older), overwrite=True)
    assert run.resume_from == older and snapshot(tmp_path) == before
    run.commit()
    assert [p.name for p in Checkpointer(tmp_path).list_checkpoints()] == ["step_00000001"]
    assert not (tmp_path / "checkpoints" / "best.json").exists()  # it named a removed checkpoint
    assert (tmp_path / "checkpoints" / "my_model.pt").read_bytes() == b"mine"
    assert prepare_run_dir(tmp_path, resume=str(tmp_path)).resume_from == older  # the latest: nothing replaced


def test_resume_from_another_run_is_refused_over_checkpoints_and_forks_into_a_new_folder(tmp_path):
    source = fake_run(tmp_path / "source")
    target = fake_run(tmp_path / "target", steps=(7,), best=None)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"mix another run's checkpoints into .*step_00000007"):
        prepare_run_dir(target, resume=str(source))
    assert snapshot(tmp_path) == before
    run = prepare_run_dir(target, resume=str(source), overwrite=True)
    assert run.resume_from == source / "checkpoints" / "step_00000003"
    run.commit()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(USER_FILES)
    assert snapshot(source) == {k[len("source/") :]: v for k, v in before.items() if k.startswith("source/")}
    fork = tmp_path / "fork"
    assert prepare_run_dir(fork, resume=str(source)).resume_from.name == "step_00000003"


def test_out_dir_that_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_run_dir(target)
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    target.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            prepare_run_dir(target)
    finally:
        target.chmod(0o755)


@pytest.mark.parametrize(
    "code, needle", [(errno.ENOSPC, "is full"), (errno.EROFS, "is not writable"), (errno.EACCES, "is not writable")]
)
def test_full_or_read_only_disk_is_one_line_before_anything_changes(tmp_path, monkeypatch, code, needle):
    fake_run(tmp_path)
    before = snapshot(tmp_path)
    real_write = os.write

    def failing(fd, data):
        if len(data) >= 1 << 20:  # the set-up probe
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(UserError, match=needle) as err:
        prepare_run_dir(tmp_path, overwrite=True)
    monkeypatch.undo()
    assert "\n" not in str(err.value) and snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# through `tokenmill train`: exit 2, one line, the previous run byte-identical


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """A finished 2-step tiny run with a checkpoint at each step, copied fresh into every test."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(cli_args(run_dir, 2, "checkpoint.interval_steps=1")) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture
def finished_run(template_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(template_run, run_dir)
    capsys.readouterr()
    return run_dir


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "mistake, needle",
    [
        ("train.seq_len=128", "model.max_seq_len"),  # found only after the tokenizer is built
        ("data.sources=[/no/such/corpus.jsonl]", "corpus.jsonl"),  # found when the loader opens it
    ],
    ids=["seq_len", "source"],
)
def test_overwrite_with_a_typo_leaves_the_previous_run(finished_run, capsys, mistake, needle):
    before = snapshot(finished_run)
    assert main([*cli_args(finished_run, 2, "checkpoint.interval_steps=1", mistake), "--overwrite"]) == 2
    one_error_line(capsys, needle)
    assert snapshot(finished_run) == before


def test_resume_of_an_older_step_is_refused_on_the_command_line(finished_run, capsys):
    before = snapshot(finished_run)
    older = finished_run / "checkpoints" / "step_00000001"
    assert main([*cli_args(finished_run, 3, "checkpoint.interval_steps=1"), "--resume", str(older)]) == 2
    one_error_line(capsys, "step_00000002", "--overwrite")
    assert snapshot(finished_run) == before
    assert main([*cli_args(finished_run, 3, "checkpoint.interval_steps=1"), "--resume", str(older), "--overwrite"]) == 0
    names = [p.name for p in Checkpointer(finished_run).list_checkpoints()]
    assert names == ["step_00000001", "step_00000002", "step_00000003"]  # step 2 re-made from step 1
    resumed = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in resumed if e["kind"] == "resume"] == [1]


def test_out_dir_that_is_a_file_on_the_command_line(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert main(cli_args(target, 2)) == 2
    one_error_line(capsys, "is a file")
    assert target.read_text() == "not a folder"

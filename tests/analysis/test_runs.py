"""Reading a run folder: sessions, rewinds on resume, fresh restarts in one file, damaged lines, bad folders."""

from __future__ import annotations

import pytest
from run_fixtures import T0, completed_events, config, startup, summary, train, write_run

from tokenmill.analysis.runs import flatten, load_run, load_runs
from tokenmill.errors import UserError


def test_resume_rewinds_every_event_after_its_step(tmp_path):
    """A stopped run (summary at 6) resumed from step 3: its steps 4-6 and its summary are history no more."""
    first = [config(), startup()] + [train(s, 5.0 - s / 10) for s in range(1, 7)] + [summary(6, status="stopped")]
    t2 = T0 + 50
    second = [
        config(step=3, t=t2),
        {"kind": "resume", "step": 3, "time": t2, "path": "p3"},
        startup(3, t2),
        train(4, 1.0, t=t2 + 1),
        summary(4, t=t2 + 2),
    ]
    run = load_run(write_run(tmp_path / "r", first + second))
    assert [(e.kind, e.step) for e in run.events if e.kind in ("train", "summary", "resume")] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("resume", 3),
        ("train", 4),
        ("summary", 4),
    ]
    assert run.summary_event.get("status") == "completed" and run.sessions == 2
    assert run.wall_time_s == pytest.approx(3.0 + 2.0)


def test_stop_then_resume_at_the_same_step_keeps_the_stop_on_record(tmp_path):
    first = [config(), startup(), train(1, 4.0), train(2, 3.0), summary(2, status="stopped")]
    t2 = T0 + 50
    second = [
        config(step=2, t=t2),
        {"kind": "resume", "step": 2, "time": t2, "path": "p2"},
        train(3, 2.0, t=t2 + 1),
        summary(3, t=t2 + 2),
    ]
    run = load_run(write_run(tmp_path / "r", first + second))
    assert [e.get("status") for e in run.of_kind("summary")] == ["stopped", "completed"]
    assert [e.elapsed_s for e in run.of_kind("train")] == pytest.approx([1.0, 2.0, 2.9 + 1.0])


def test_a_fresh_run_in_the_same_file_replaces_the_old_one(tmp_path):
    old = [config(lr=0.5), startup()] + [train(s, 9.0) for s in range(1, 4)] + [summary(3)]
    t2 = T0 + 100
    new = [config(lr=0.1, t=t2), startup(t=t2), train(1, 4.0, t=t2 + 1), summary(1, t=t2 + 2)]
    run = load_run(write_run(tmp_path / "r", old + new))
    assert [e.get("loss") for e in run.of_kind("train")] == [4.0]
    assert run.config["optim"]["lr"] == 0.1 and run.sessions == 1 and run.resumes == []


def test_corrupt_lines_are_skipped_with_one_warning(tmp_path):
    folder = write_run(tmp_path / "r", completed_events())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[3] = "not json at all"
    lines[5] = '["a list"]'
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(folder)
    assert len(run.warnings) == 1 and "skipped 2 unreadable lines (line 4, 6)" in run.warnings[0]
    assert [e.step for e in run.of_kind("train")] == [1, 3, 5, 6, 7, 8, 9, 10]


def test_config_comes_from_the_config_event_or_a_checkpoint(tmp_path):
    assert load_run(write_run(tmp_path / "a", completed_events())).config["model"]["norm"] == "rmsnorm"
    folder = write_run(tmp_path / "b", [train(1, 3.0)])
    step = folder / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text("model:\n  norm: layernorm\n")
    assert load_run(folder).config == {"model": {"norm": "layernorm"}}


def test_a_metrics_file_path_works_like_its_folder(tmp_path):
    folder = write_run(tmp_path / "run", completed_events())
    assert load_run(folder / "metrics.jsonl").path == folder


def test_runs_with_the_same_folder_name_get_distinct_names(tmp_path):
    a = write_run(tmp_path / "x" / "demo", completed_events())
    b = write_run(tmp_path / "y" / "demo", completed_events())
    c = write_run(tmp_path / "other", completed_events())
    assert [r.name for r in load_runs([a, b, c])] == ["x/demo", "y/demo", "other"]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "is not a run folder: it has no metrics.jsonl"),
        (lambda p: None, "does not exist"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), "is empty"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("garbage\n{}\n")), "holds no readable event"),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, make, needle):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(UserError, match=needle):
        load_run(path)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_a_folder_of_runs_names_the_pattern_to_pass(tmp_path):
    for cell in ("norm=a", "norm=b"):
        write_run(tmp_path / "ablation" / cell / "seed1", completed_events())
    with pytest.raises(UserError, match=r"holds 2 runs: pass .*ablation/\*/\*\)$"):
        load_run(tmp_path / "ablation")

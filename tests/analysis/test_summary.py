"""`summarize` on fixture logs gives exact numbers: a clean run, a resumed run whose killed session logged steps
the resume replays, a killed run, and a run with non-finite and diverged events."""

from __future__ import annotations

import json

import pytest
from run_fixtures import (
    LOSSES,
    T0,
    checkpoint,
    completed_events,
    config,
    evaluation,
    startup,
    summary,
    train,
    write_run,
)

from tokenmill.analysis.runs import load_run
from tokenmill.analysis.summary import markdown_table, summarize, summary_rows, text_table

# What the 10-step fixture run must summarise to (losses in run_fixtures.LOSSES; eval = train loss + 0.25).
EXPECTED = {
    "status": "completed",
    "steps": 10,
    "total_steps": 10,
    "tokens": 1000,
    "params": 12345,
    "final_loss": 3.3,
    "final_loss_step": 10,
    "min_loss": 2.6,
    "min_loss_step": 8,
    "best_loss": pytest.approx((3.0 + 2.9 + 3.1 + 2.6 + 2.85) / 5),
    "best_loss_step": 9,
    "eval_loss": 3.55,
    "eval_ppl": pytest.approx(2**3.55),
    "eval_bpb": 1.775,
    "eval_step": 10,
    "best_eval_loss": 3.25,
    "best_eval_bpb": 1.625,
    "best_eval_step": 5,
    "tokens_per_s": 1005.5,
    "mfu": None,
    "max_grad_norm": 2.0,
    "max_grad_norm_step": 10,
    "lr_min": pytest.approx(1e-4),
    "lr_max": pytest.approx(1e-3),
    "skipped_steps": 0,
    "nonfinite": [],
    "diverged": [],
}


def test_completed_run(tmp_path):
    s = summarize(load_run(write_run(tmp_path / "run", completed_events())))
    assert {k: s[k] for k in EXPECTED} == EXPECTED
    assert s["wall_time_s"] == pytest.approx(10.9) and s["sessions"] == 1 and s["resumes"] == []
    assert s["run"] == "run" and json.loads(json.dumps(s)) == s  # plain JSON


def test_resumed_run_reads_as_if_it_never_stopped(tmp_path):
    """Session 1 checkpoints at step 4, logs steps 5-7 (with other values) and dies mid-line; session 2 resumes
    at 4 and its first line lands after the torn one. Steps 5-7 of session 1 must not count."""
    first = [config(), startup()]
    first += [train(step, LOSSES[step - 1]) for step in range(1, 5)]
    first.append(checkpoint(4, T0 + 4.2))
    first += [train(5, 9.0), evaluation(5, 9.9), train(6, 9.0), train(7, 0.5)]  # rewound by the resume
    t2 = T0 + 100.0
    second = [
        config(step=4, t=t2),
        {"kind": "resume", "step": 4, "time": t2, "path": "checkpoints/step_4"},
        startup(step=4, t=t2),
    ]
    for step in range(5, 11):
        second.append(train(step, LOSSES[step - 1], t=t2 + step - 4))
        if step % 5 == 0:
            second.append(evaluation(step, LOSSES[step - 1] + 0.25, t=t2 + step - 4 + 0.5))
    second += [checkpoint(10, t2 + 6.7), summary(10, t=t2 + 6.9)]
    folder = tmp_path / "resumed"
    write_run(folder, first)
    with open(folder / "metrics.jsonl", "a") as handle:  # the kill cut the last line; the resume appends to it
        handle.write('{"kind": "train", "step": 8, "ti' + "".join(json.dumps(e) + "\n" for e in second))
    run = load_run(folder)
    s = summarize(run)
    assert {k: s[k] for k in EXPECTED} == EXPECTED
    assert s["resumes"] == [{"step": 4, "path": "checkpoints/step_4"}] and s["sessions"] == 2
    assert s["wall_time_s"] == pytest.approx(4.2 + 6.9)  # the 93 s the run was down do not count
    assert [e.step for e in run.of_kind("train")] == list(range(1, 11))
    assert len(run.warnings) == 1 and "line 12" in run.warnings[0]


def test_killed_run_is_incomplete_with_what_it_logged(tmp_path):
    events = [config(), startup()] + [train(step, LOSSES[step - 1]) for step in range(1, 7)]
    events.insert(7, evaluation(5, 3.25))
    run = load_run(write_run(tmp_path / "killed", events, tail='{"kind": "train", "step": 7, "time": 17000'))
    s = summarize(run)
    assert s["status"] == "incomplete" and s["steps"] == 6 and s["tokens"] == 600
    assert (s["final_loss"], s["final_loss_step"], s["min_loss"], s["min_loss_step"]) == (2.9, 6, 2.9, 6)
    assert (s["best_loss"], s["best_loss_step"]) == (pytest.approx((4.0 + 3.5 + 3.6 + 3.0 + 2.9) / 5), 6)
    assert (s["eval_loss"], s["eval_step"]) == (3.25, 5)
    assert s["wall_time_s"] == pytest.approx(6.0)
    assert len(run.warnings) == 1 and "line 10" in run.warnings[0]
    row = dict(summary_rows([s], now=T0 + 3600 + 6))["status"]
    assert row == ["incomplete (running or killed; last event 1h00m ago)"]


def test_short_run_has_no_best_window(tmp_path):
    events = [config(), startup(), train(1, 4.0), train(2, 3.0), summary(2)]
    s = summarize(load_run(write_run(tmp_path / "short", events)))
    assert (s["best_loss"], s["best_loss_step"], s["final_loss"], s["min_loss"]) == (None, None, 3.0, 3.0)
    assert s["eval_loss"] is None and s["eval_step"] is None


def test_nonfinite_and_diverged_events(tmp_path):
    events = [
        config(),
        startup(),
        train(1, 4.0),
        train(2, 3.9),
        {"kind": "nonfinite", "step": 2, "time": T0 + 2.5, "loss": None, "grad_norm": None},
        train(3, 3.8, skipped=1),
        train(4, 7.5, skipped=1),
        {"kind": "diverged", "step": 4, "time": T0 + 4.5, "loss": 7.5, "reason": "fast EMA 7.5 > slow 4"},
        summary(4, status="diverged", skipped=1),
    ]
    s = summarize(load_run(write_run(tmp_path / "bad", events)))
    assert s["status"] == "diverged" and s["skipped_steps"] == 1
    assert s["nonfinite"] == [{"step": 2, "loss": None, "grad_norm": None}]
    assert s["diverged"] == [{"step": 4, "loss": 7.5, "reason": "fast EMA 7.5 > slow 4"}]
    problems = dict(summary_rows([s]))["problems"][0]
    assert problems == "non-finite at step 2; diverged at step 4 (fast EMA 7.5 > slow 4)"


def test_tables_have_one_column_per_run(tmp_path):
    a = summarize(load_run(write_run(tmp_path / "a", completed_events())))
    b = summarize(load_run(write_run(tmp_path / "b", completed_events([x + 1 for x in LOSSES]))))
    rows = summary_rows([a, b])
    assert dict(rows)["train loss final"] == ["3.3000 @10", "4.3000 @10"]
    text = text_table(["", "a", "b"], rows).splitlines()
    assert text[0].split() == ["a", "b"] and set(text[1]) == {"-", " "}
    md = markdown_table(["", "a", "b"], rows).splitlines()
    assert md[0] == "|  | a | b |" and md[1] == "| --- | --- | --- |" and len(md) == len(rows) + 2

"""`logs compare`: a config diff of the keys that differ, the first step past the tolerance, and exit codes a CI
job can use (0 equal, 1 parted)."""

from __future__ import annotations

import json

import pytest
from run_fixtures import LOSSES, completed_events, write_run

from tokenmill.analysis.compare import compare_runs, config_diff, render_comparison
from tokenmill.analysis.runs import load_run
from tokenmill.cli import main
from tokenmill.errors import UserError


def injected(step: int, delta: float) -> list[float]:
    return [loss + delta if s == step else loss for s, loss in enumerate(LOSSES, start=1)]


@pytest.fixture
def base(tmp_path):
    return write_run(tmp_path / "a", completed_events(out_dir="runs/a"))


def test_equal_runs_exit_0(base, tmp_path, capsys):
    same = write_run(tmp_path / "b", completed_events(out_dir="runs/b"))  # only the folder differs
    assert main(["logs", "compare", str(base), str(same)]) == 0
    out = capsys.readouterr().out
    assert "config differences: none" in out and "equal: loss agrees at all 10 steps within 0" in out


def test_injected_difference_is_found_at_its_step(base, tmp_path, capsys):
    other = write_run(tmp_path / "b", completed_events(injected(7, 0.01), lr=3e-3))
    assert main(["logs", "compare", str(base), str(other), "--tolerance", "0.001"]) == 1
    out = capsys.readouterr().out
    assert "diverged at step 7" in out and "<- first divergence" in out
    assert main(["logs", "compare", str(base), str(other), "--tolerance", "0.02"]) == 0
    comparison = compare_runs(load_run(base), load_run(other), tolerance=0.001)
    assert comparison.first_divergence == 7 and comparison.max_abs_diff_step == 7
    assert comparison.max_abs_diff == pytest.approx(0.01)
    assert comparison.config_diff == [("optim.lr", 1e-3, 3e-3)]


def test_json_report(base, tmp_path, capsys):
    other = write_run(tmp_path / "b", completed_events(injected(3, -0.5)))
    assert main(["logs", "compare", str(base), str(other), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["equal"] is False and report["first_divergence_step"] == 3
    assert report["steps"][2] == {"step": 3, "a": 3.5, "b": 3.0, "diff": -0.5}
    assert [s["final_loss"] for s in report["summaries"]] == [3.3, 3.3]


def test_a_step_only_one_run_logged_is_a_divergence(base, tmp_path):
    shorter = write_run(tmp_path / "b", completed_events(LOSSES[:8]))
    comparison = compare_runs(load_run(base), load_run(shorter), tolerance=1.0)
    assert comparison.first_divergence == 9 and not comparison.equal
    assert comparison.rows[-1] == (10, 3.3, None)


def test_eval_loss_can_be_compared(base, tmp_path):
    other = write_run(tmp_path / "b", completed_events(injected(10, 0.2)))
    comparison = compare_runs(load_run(base), load_run(other), metric="eval_loss", tolerance=0.1)
    assert comparison.first_divergence == 10 and [row[0] for row in comparison.rows] == [5, 10]


def test_per_block_metrics_and_negative_tolerance_are_refused(base):
    run = load_run(base)
    with pytest.raises(UserError, match="one curve per block"):
        compare_runs(run, run, metric="update_ratio")
    with pytest.raises(UserError, match="--tolerance -1"):
        compare_runs(run, run, tolerance=-1)


def test_config_diff_ignores_the_run_folder_and_lists_missing_keys():
    a = {"model": {"norm": "rmsnorm", "bias": False}, "train": {"out_dir": "runs/a"}}
    b = {"model": {"norm": "layernorm"}, "train": {"out_dir": "runs/b"}}
    assert config_diff(a, b) == [("model.bias", False, None), ("model.norm", "rmsnorm", "layernorm")]


def test_report_shows_edges_and_the_divergence(tmp_path):
    long = [5.0 - 0.01 * s for s in range(40)]
    a = write_run(tmp_path / "a", completed_events(long))
    b = write_run(tmp_path / "b", completed_events([x + (0.1 if s >= 20 else 0) for s, x in enumerate(long)]))
    text = render_comparison(compare_runs(load_run(a), load_run(b), tolerance=0.05))
    shown = [line.split()[0] for line in text.split("loss per step")[1].split("\n\n")[0].splitlines()[3:]]
    assert shown == ["1", "2", "3", "4", "5", "...", "19", "20", "21", "22", "23", "...", "36", "37", "38", "39", "40"]

"""benchmarks/recipe.py: the interpolation of tokens-to-target, and a two-step smoke run of two recipes that
writes the table and the JSON (so the benchmark cannot rot)."""

from __future__ import annotations

import json
import math

import pytest

from bench_helpers import imported_benchmark


@pytest.fixture(scope="module")
def bench():
    with imported_benchmark("recipe") as module:
        yield module


def test_tokens_to_target_interpolates_between_points(bench):
    points = [
        {"tokens": 100, "bpb": 3.0, "train_wall_s": 10.0},
        {"tokens": 200, "bpb": 2.0, "train_wall_s": 20.0},
        {"tokens": 300, "bpb": 1.5, "train_wall_s": 40.0},
    ]
    assert bench.tokens_to_target(points, 2.5) == pytest.approx(150)
    assert bench.tokens_to_target(points, 1.75) == pytest.approx(250)
    assert bench.tokens_to_target(points, 1.75, "train_wall_s") == pytest.approx(30.0)
    assert bench.tokens_to_target(points, 3.5) == 100  # reached at the first point
    assert bench.tokens_to_target(points, 1.0) is None  # never reached


def test_unknown_recipe_is_one_error_line(bench, capsys):
    assert bench.main(["--recipes", "baseline,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "baseline" in err[0]


@pytest.mark.slow  # two 2-step runs in child processes, a small BPE and two held-out evaluations: ~70 s
def test_smoke_run_writes_table_and_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--recipes", "baseline,recipe", "--tokens", "4096", "--points", "2", "--vocab", "300"]
    argv += ["--eval-fraction", "0.003", "--tokenizer-docs", "40", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "baseline | 0 |" in table and "recipe | 0 |" in table
    report = json.loads(out.read_text())
    assert [r["recipe"] for r in report["results"]] == ["baseline", "recipe"]
    for r in report["results"]:
        assert [p["tokens"] for p in r["points"]] == [2048, 4096]
        assert all(math.isfinite(p["bpb"]) and p["bpb"] > 0 for p in r["points"])
        assert r["cpu_s"] > 0 and r["wall_s"] > 0
    baseline = report["results"][0]
    assert report["meta"]["target_bpb"] == baseline["points"][-1]["bpb"]
    assert 2048 <= baseline["tokens_to_target"] <= 4096  # the target is its own final bpb
    assert "optim.name=adamw" in report["meta"]["recipes"]["baseline"]
    # a second call reuses the finished runs (same overrides) instead of training again
    assert bench.main(argv) == 0
    assert json.loads(out.read_text())["results"][1]["cpu_s"] == report["results"][1]["cpu_s"]

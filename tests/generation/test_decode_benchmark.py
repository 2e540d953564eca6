"""benchmarks/decode.py runs end to end on a tiny budget and prints one table row per model and batch, with every
method's rate and the paired ratios (the speed goals themselves are read from its full run, never asserted)."""

from __future__ import annotations

import re

import pytest

from bench_helpers import imported_benchmark


@pytest.fixture(scope="module")
def decode_benchmark():
    with imported_benchmark("decode") as module:
        yield module


def test_the_decode_benchmark_prints_a_row_per_model_and_batch(decode_benchmark, capsys):
    argv = ["--models", "tiny", "--batches", "1,2", "--new-tokens", "3", "--rounds", "1", "--recompute-points", "2"]
    decode_benchmark.main([*argv, "--devices", "cpu", "--no-compile"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["tiny", "1"], ["tiny", "2"]]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        kv, compiled, recompute, hf = cells[3:7]
        assert float(kv) > 0 and float(recompute) > 0 and float(hf) > 0 and compiled == "-"
        assert all(re.fullmatch(r"\d+\.\d\dx", ratio) for ratio in cells[7:9]) and cells[9] == "-"
        assert re.fullmatch(r"\d+%", cells[10])  # the noise band: 0% with one round
        assert float(cells[11]) > 0 and re.fullmatch(r"\d+\.\d\dx", cells[12])  # matmuls only: the ceiling

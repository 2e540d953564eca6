"""benchmarks/gpu_suite.py: its CPU smoke run covers every planned configuration and writes the table and JSON;
on a GPU (`-m gpu`) FP8 and the fused losses keep 50-step loss parity with bf16 and the suite's budget holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench_helpers import imported_benchmark
from train_helpers import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def suite():
    with imported_benchmark("gpu_suite") as module:
        yield module


def run(suite, tmp_path: Path, *argv: str) -> dict:
    assert suite.main([*argv, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "gpu_suite.md").read_text()
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert table.count("\n| ") == len(report["rows"]) + 1  # the header and one line per configuration
    return {(r["model"], r["lever"]): r for r in report["rows"]}


@pytest.mark.slow  # ~16 tiny configurations with model builds and memory estimates: 20-40 s on a busy machine
def test_cpu_smoke_run_covers_the_whole_plan(suite, tmp_path):
    rows = run(suite, tmp_path, "--smoke")
    assert list(rows) == suite.PLAN
    for (model, lever), row in rows.items():
        spec = suite.LEVERS[lever]
        if spec.cuda_only or lever.startswith(("fp8", "loss-liger", "loss-cce")):
            assert row["status"] == "skipped" and row["note"] and "\n" not in row["note"], (model, lever)
            continue
        assert row["status"] == "ok", (model, lever, row["note"])
        assert row["tokens_per_s"] > 0 and row["micro_batch"] == 2 and len(row["losses"]) == 4
        assert all(math.isfinite(x) for x in row["losses"])
        if lever != spec.reference:  # AC and the chunked loss: the same curve as plain, on the CPU in fp32
            assert row["parity"]["ok"] and row["parity"]["reference"] == spec.reference, (model, lever, row["parity"])
        if lever != "ac-every-2":
            assert row["estimate_gib"] > 0


def test_selection_keeps_reference_runs(suite):
    args = suite.parse_args(["--models", "dense-180m", "--levers", "flex-docmask"])
    assert suite.plan(args) == [("dense-180m", "sdpa-docmask"), ("dense-180m", "flex-docmask")]
    assert suite.plan(suite.parse_args(["--levers", "bf16"])) == [(m, "bf16") for m in suite.MODELS]


def test_markov_batches_are_reproducible_and_learnable(suite):
    a, b = suite.markov_batches(100, 2, 64), suite.markov_batches(100, 2, 64)
    assert all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["doc_ids"], y["doc_ids"]) for x, y in zip(a, b))
    tokens = a[0]["tokens"]
    pairs = {(int(p), int(n)) for p, n in zip(tokens[:, :-1].flatten(), tokens[:, 1:].flatten())}
    assert len({n for p, n in pairs if p == int(tokens[0, 0])}) <= suite.SUCCESSORS  # few successors per token
    assert (a[0]["doc_ids"].diff(dim=1) >= 0).all() and a[0]["doc_ids"].shape == tokens.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message only shows without CUDA")
def test_without_a_gpu_it_says_so_and_measures_nothing(suite, tmp_path, capsys):
    assert suite.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU here, nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "gpu_suite.json").exists()


# ---- on a GPU ---------------------------------------------------------------------------------------------------


def _needs(row: dict) -> None:
    if row["status"] == "skipped" and ("pip install" in row["note"] or "compute capability" in row["note"]):
        pytest.skip(row["note"])


GPU_LEVERS = ("fp8-tensorwise", "fp8-rowwise", "loss-cce", "loss-liger")


@pytest.fixture(scope="module")
def llama_levers(suite, tmp_path_factory):
    """One suite call: plain bf16 and each lever for 50 steps on llama3-1b (the baseline runs once)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    return run(suite, out, "--models", "llama3-1b", "--levers", *GPU_LEVERS, "--steps", "50", "--budget-s", "600")


@pytest.mark.gpu
@pytest.mark.parametrize("lever", GPU_LEVERS)
def test_lever_keeps_50_step_parity_with_bf16(llama_levers, lever):
    row, plain = llama_levers[("llama3-1b", lever)], llama_levers[("llama3-1b", "bf16")]
    _needs(row)
    assert plain["status"] == "ok" and row["status"] == "ok", (plain["note"], row["note"])
    assert plain["losses"][-1] < plain["losses"][0] - 1  # the synthetic data is learnable: parity means something
    assert row["parity"]["ok"], row["parity"]


@pytest.mark.gpu
def test_gpu_suite_smoke_within_budget(suite, tmp_path):
    rows = run(suite, tmp_path, "--models", "gpt2-124m", "--levers", "bf16", "ac-all", "--steps", "10")
    for row in rows.values():
        assert row["status"] == "ok", row["note"]
        assert row["mfu"] is None or 0 < row["mfu"] < 1
        assert row["peak_gib"] > 0 and row["reserved_gib"] >= row["peak_gib"]
    assert rows[("gpt2-124m", "ac-all")]["peak_gib"] < rows[("gpt2-124m", "bf16")]["peak_gib"]

"""P6: every strategy on 2 gloo processes equals one process with the equivalent gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import full_params, run_loop, run_ranks, tiny_config

STEPS = 5


def _worker(strategy: str, pp: int, schedule: str, micro_batch: int) -> dict:
    cfg = tiny_config(strategy, pp, schedule, micro_batch)
    out = run_loop(cfg, STEPS)
    return {"losses": out["losses"], "norms": out["norms"], "params": full_params(out["engine"]),
            "dp": out["engine"].dp_size}


@pytest.fixture(scope="module")
def reference() -> dict:
    out = run_loop(tiny_config("single"), STEPS)
    return {"losses": out["losses"], "norms": out["norms"], "params": full_params(out["engine"])}


def _check(results: list[dict], reference: dict) -> None:
    for r in results:
        assert r["losses"] == pytest.approx(reference["losses"], abs=1e-5, rel=0)
        assert r["norms"] == pytest.approx(reference["norms"], abs=1e-5, rel=1e-5)
    merged = {}
    for r in results:
        merged.update(r["params"])
    assert merged.keys() == reference["params"].keys()
    for k, v in reference["params"].items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=1e-5, msg=k)
    # the run actually trained (a wrong harness cannot pass by doing nothing)
    assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp"])
def test_data_parallel_matches_single_process(strategy, reference):
    results = run_ranks(_worker, 2, strategy, 1, "1F1B", 2, timeout=90)
    assert [r["dp"] for r in results] == [2, 2]
    _check(results, reference)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_pipeline_matches_single_process(schedule, reference):
    results = run_ranks(_worker, 2, "single", 2, schedule, 4, timeout=90)
    assert [r["dp"] for r in results] == [1, 1]
    # each pp rank holds half the blocks: together they are the whole model
    assert not set(results[0]["params"]) & set(results[1]["params"])
    _check(results, reference)

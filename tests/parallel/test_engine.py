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


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_pipeline_matches_single_process(schedule, reference):
    results = run_ranks(_worker, 2, "single", 2, schedule, 4, timeout=90)
    assert [r["dp"] for r in results] == [1, 1]
    # each pp rank holds half the blocks: together they are the whole model
    assert not set(results[0]["params"]) & set(results[1]["params"])
    _check(results, reference)


def _sync_and_metrics_body() -> dict:
    import torch.nn as nn

    from tokenmill.parallel.data_parallel import apply_ddp, no_sync_context
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.global_ops import global_token_count, loss_denominator, reduce_metrics

    dist = init_distributed(tiny_config().parallel, "cpu")
    torch.manual_seed(0)
    ddp = apply_ddp(nn.Linear(4, 1), dist)
    x = torch.full((2, 4), float(dist.rank + 1))  # different data per rank
    with no_sync_context(ddp, sync=False):
        ddp(x).sum().backward()
    local = ddp.module.weight.grad.clone()  # not synchronised: still this rank's own gradient
    with no_sync_context(ddp, sync=True):
        ddp(x).sum().backward()
    synced = ddp.module.weight.grad.clone()
    metrics = reduce_metrics({"tokens_per_s": 100.0 * (dist.rank + 1), "step_time_s": 1.0 + dist.rank,
                              "loss": float(dist.rank)}, dist)
    return {"local": local, "synced": synced, "metrics": metrics,
            "tokens": float(global_token_count(10 + dist.rank, dist)),
            "denominator": float(loss_denominator(10 + dist.rank, dist))}


def test_no_sync_and_global_metrics():
    r0, r1 = run_ranks(_sync_and_metrics_body, 2, timeout=60)
    # no_sync: each rank kept its own gradient (rank 1's data is twice rank 0's)
    torch.testing.assert_close(r1["local"], 2 * r0["local"])
    # sync: both ranks hold the same average of (accumulated local) gradients: (2g + 4g) / 2 = 3g
    torch.testing.assert_close(r0["synced"], r1["synced"])
    torch.testing.assert_close(r0["synced"], 3 * r0["local"])
    for r in (r0, r1):
        assert r["metrics"] == {"tokens_per_s": 300.0, "step_time_s": 2.0, "loss": 0.5}
        assert r["tokens"] == 21.0 and r["denominator"] == 10.5


def _eval_worker(strategy: str, pp: int, init: str) -> dict:
    cfg = tiny_config(strategy, pp, "GPipe", 4 if pp > 1 else 2, init=init)
    out = run_loop(cfg, 2)
    engine = out["engine"]
    window = torch.arange(4 * 9).reshape(4, 9) % 64
    with torch.no_grad():
        engine.model.eval()
        eval_sum = float(engine.model.loss(window, reduction="sum"))
        engine.model.train()
    inf = engine.inference_model()  # a collective when sharded
    return {"eval": eval_sum, "inference": None if inf is None else {k: v.clone() for k, v in inf.state_dict().items()},
            "losses": out["losses"]}


@pytest.mark.parametrize("strategy,pp", [("fsdp", 1), ("single", 2)])
def test_eval_and_inference_model_when_sharded(strategy, pp):
    from dist_helpers import tiny_config as cfg_of
    from tokenmill.model import build_model

    ref = run_loop(cfg_of("single"), 2)
    params = full_params(ref["engine"])
    r0, r1 = run_ranks(_eval_worker, 2, strategy, pp, "full", timeout=90)
    model = build_model(cfg_of().model)
    model.load_state_dict(params)
    window = torch.arange(4 * 9).reshape(4, 9) % 64
    with torch.no_grad():
        expected = float(model.loss(window, reduction="sum"))
    assert r0["eval"] == pytest.approx(expected, rel=1e-5) and r1["eval"] == pytest.approx(expected, rel=1e-5)
    assert r1["inference"] is None and r0["inference"].keys() == params.keys()
    for k, v in params.items():
        torch.testing.assert_close(r0["inference"][k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy,pp", [("fsdp", 1), ("single", 2)])
def test_sharded_init_trains(strategy, pp):
    """init=sharded: each rank initialises only its shards/stages (nothing left uninitialised)."""
    r0, _ = run_ranks(_eval_worker, 2, strategy, pp, "sharded", timeout=90)
    full = r0["inference"]
    assert all(torch.isfinite(v).all() for v in full.values())
    # initial loss of a freshly initialised model is close to ln(vocab) = 4.16 (garbage weights are not)
    assert abs(r0["losses"][0] - 4.16) < 0.2
    for k, v in full.items():
        if k.endswith("proj.weight") or k.endswith("head.weight"):
            assert 0.001 < float(v.std()) < 0.1, k


def _fsdp_options_worker(options: dict) -> list[float]:
    return run_loop(tiny_config("fsdp", **options), STEPS)["losses"]


def test_fsdp_options(reference):
    # ZeRO-2 style (keep gathered parameters) and CPU offload (a no-op on CPU devices) change no numbers
    exact, _ = run_ranks(_fsdp_options_worker, 2, {"fsdp_reshard_after_forward": False, "fsdp_cpu_offload": True},
                         timeout=90)
    assert exact == pytest.approx(reference["losses"], abs=1e-5)
    # bf16 compute and gradient reduction: within bf16 noise of fp32, and not bit-identical (the policy is on)
    bf16, _ = run_ranks(_fsdp_options_worker, 2, {"fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "bf16"},
                        timeout=90)
    assert bf16 == pytest.approx(reference["losses"], abs=1e-2)
    assert bf16 != pytest.approx(reference["losses"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_pipeline_with_data_parallel(strategy, reference):
    """4 processes as a (dp=2, pp=2) mesh: stages replicated (ddp) or sharded (fsdp) over dp, with accumulation."""
    results = run_ranks(_worker, 4, strategy, 2, "1F1B", 2, timeout=150)
    assert [r["dp"] for r in results] == [2, 2, 2, 2]
    _check(results, reference)

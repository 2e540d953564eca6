"""P6: every strategy on 2 gloo processes equals one process with the equivalent gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import SEQ, full_params, global_batches, run_loop, run_ranks, tiny_config

STEPS = 5


def _worker(strategy: str, pp: int, schedule: str, micro_batch: int) -> dict:
    cfg = tiny_config(strategy, pp, schedule, micro_batch)
    out = run_loop(cfg, STEPS)
    return {
        "losses": out["losses"],
        "norms": out["norms"],
        "params": full_params(out["engine"]),
        "dp": out["engine"].dp_size,
    }


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
    metrics = reduce_metrics(
        {"tokens_per_s": 100.0 * (dist.rank + 1), "step_time_s": 1.0 + dist.rank, "loss": float(dist.rank)}, dist
    )
    return {
        "local": local,
        "synced": synced,
        "metrics": metrics,
        "tokens": float(global_token_count(10 + dist.rank, dist)),
        "denominator": float(loss_denominator(10 + dist.rank, dist)),
    }


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
    return {
        "eval": eval_sum,
        "inference": None if inf is None else {k: v.clone() for k, v in inf.state_dict().items()},
        "losses": out["losses"],
    }


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
        if k.endswith(("proj.weight", "head.weight")):
            assert 0.001 < float(v.std()) < 0.1, k


def _fsdp_options_worker(options: dict) -> list[float]:
    return run_loop(tiny_config("fsdp", **options), STEPS)["losses"]


def test_fsdp_options(reference):
    # ZeRO-2 style (keep gathered parameters) and CPU offload (a no-op on CPU devices) change no numbers
    exact, _ = run_ranks(
        _fsdp_options_worker, 2, {"fsdp_reshard_after_forward": False, "fsdp_cpu_offload": True}, timeout=90
    )
    assert exact == pytest.approx(reference["losses"], abs=1e-5)
    # bf16 compute and gradient reduction: within bf16 noise of fp32, and not bit-identical (the policy is on)
    bf16, _ = run_ranks(_fsdp_options_worker, 2, {"fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "bf16"}, timeout=90)
    assert bf16 == pytest.approx(reference["losses"], abs=1e-2)
    assert bf16 != pytest.approx(reference["losses"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_pipeline_with_data_parallel(strategy, reference):
    """4 processes as a (dp=2, pp=2) mesh: stages replicated (ddp) or sharded (fsdp) over dp, with accumulation."""
    results = run_ranks(_worker, 4, strategy, 2, "1F1B", 2, timeout=150)
    assert [r["dp"] for r in results] == [2, 2, 2, 2]
    _check(results, reference)


# ---------------------------------------------------------------------------------------------------------
# the loss denominator: the global count of valid targets of the whole optimizer step

MICRO = 2  # micro-steps per optimizer step
KEEP = ((0.9, 0.3), (0.6, 0.1))  # share of kept targets per (data-parallel rank, micro-step): every count differs


def masked_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of shape (2 ranks, MICRO, 2 rows, SEQ + 1 / SEQ); masked targets are IGNORE_INDEX."""
    from tokenmill.levers.loss import IGNORE_INDEX

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (2, MICRO, 2, SEQ + 1), generator=g)
    targets = tokens[..., 1:].clone()
    keep = torch.rand(targets.shape, generator=g) < torch.tensor(KEEP).reshape(2, MICRO, 1, 1)
    targets[~keep] = IGNORE_INDEX
    return tokens, targets


def _masked_step(strategy: str, pp: int) -> dict:
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import all_reduce, init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config(strategy, pp, "GPipe", 2)
    dist = init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(0)
    engine = Engine(build_meta(cfg.model), cfg, dist, Precision("fp32", dist.device))
    tokens, targets = masked_batches()
    rank = engine.dp_rank if engine.dp_size > 1 else None  # one data-parallel rank takes every batch
    mine = [
        {"tokens": tokens[r, m], "targets": targets[r, m]}
        for r in ([rank] if rank is not None else range(2))
        for m in range(MICRO)
    ]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    denominator = engine.loss_denominator(mine)
    total = torch.zeros(())
    for i, batch in enumerate(mine):
        total += engine.forward_backward(batch, scaler, denominator, sync=i == len(mine) - 1)
    grads = {}
    for name, p in engine.model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP: a collective
        grads[name] = grad.detach().clone()
    return {
        "loss": float(all_reduce(total, "avg")),
        "grads": grads,
        "denominator": float(denominator),
        "dp": engine.dp_size,
    }


def masked_reference() -> dict:
    """One process, by hand: every target of every rank and micro-step in one sum, over the valid count."""
    import torch.nn.functional as F

    from tokenmill.levers.loss import IGNORE_INDEX
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config("single")
    torch.manual_seed(0)
    model = Engine(build_meta(cfg.model), cfg, init_distributed(cfg.parallel, "cpu"), Precision("fp32", "cpu")).model
    tokens, targets = masked_batches()
    logits = model(tokens.flatten(0, 2)[:, :-1])  # (all rows, SEQ, V)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    valid = (targets != IGNORE_INDEX).sum()
    loss = nats / valid
    loss.backward()
    per_rank_means = [
        F.cross_entropy(
            model(tokens[r].flatten(0, 1)[:, :-1]).flatten(0, 1), targets[r].flatten(), ignore_index=IGNORE_INDEX
        ).item()
        for r in range(2)
    ]
    return {
        "loss": loss.item(),
        "valid": int(valid),
        "naive": sum(per_rank_means) / 2,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize("strategy,pp", [("ddp", 1), ("fsdp", 1), ("single", 2)])
def test_masked_targets_weigh_by_the_global_valid_count(strategy, pp):
    """Two ranks whose micro-batches mask different numbers of targets give exactly the gradient and loss of one
    process averaging over every valid target of the step (not the mean of per-rank or per-micro-step means)."""
    ref = masked_reference()
    assert abs(ref["naive"] - ref["loss"]) > 1e-3  # the masks make a per-rank mean measurably wrong
    results = run_ranks(_masked_step, 2, strategy, pp, timeout=90)
    merged = {}
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert r["denominator"] * r["dp"] == ref["valid"]
        merged.update(r["grads"])
    assert merged.keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(merged[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_masked_targets_single_process_accumulation():
    """The same hand computation in one process, accumulating all four micro-batches (no process group)."""
    ref = masked_reference()
    out = _masked_step("single", 1)
    assert out["dp"] == 1 and out["denominator"] == ref["valid"]
    assert out["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(out["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------
# the loss_fn slot and the pipeline's accumulation


def test_custom_loss_fn_is_what_the_step_back_propagates():
    from tokenmill.levers.loss import plain_loss
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config("single")
    dist = init_distributed(cfg.parallel, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {"tokens": global_batches(1)[0, :2]}
    grads = []
    for loss_fn in (None, lambda model, b: 3.0 * plain_loss(model, b)):
        torch.manual_seed(0)
        engine = Engine(build_meta(cfg.model), cfg, dist, Precision("fp32", dist.device), loss_fn=loss_fn)
        engine.forward_backward(batch, scaler, engine.loss_denominator([batch]), sync=True)
        grads.append(engine.model.head.weight.grad.clone())
    torch.testing.assert_close(grads[1], 3.0 * grads[0])


def test_custom_loss_fn_with_pipeline_stages_is_refused():
    from tokenmill.errors import UserError
    from tokenmill.levers.loss import plain_loss
    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config("single", pp=2)
    with pytest.raises(UserError, match="custom loss function needs parallel.pp=1"):
        Engine(
            build_meta(cfg.model),
            cfg,
            init_distributed(cfg.parallel, "cpu"),
            Precision("fp32", "cpu"),
            loss_fn=plain_loss,
        )


def _pp_grad_accum_run(out_dir: str, grad_accum: int, steps: int) -> dict:
    from tokenmill.cli import main
    from tokenmill.parallel.engine import Engine
    from train_helpers import cli_args

    calls = []
    real = Engine.forward_backward

    def counting(self, *args, **kwargs):
        calls.append(self.dp_size)
        return real(self, *args, **kwargs)

    Engine.forward_backward = counting
    code = main(
        [
            *cli_args(
                out_dir,
                steps,
                "parallel.pp=2",
                "model.tie_embeddings=false",
                "eval.max_batches=1",
                "eval.sample_prompts=[]",
                "parallel.timeout_s=60",
            ),
            "--grad-accum",
            str(grad_accum),
        ]
    )
    return {"code": code, "calls": calls}


def test_grad_accum_with_two_pipeline_stages_runs_n_micro_steps_per_step(tmp_path):
    """`--grad-accum 3` with parallel.pp=2 on 2 processes: the two ranks are stages of ONE replica, so each runs
    3 micro-steps per optimizer step (not 3 x world size), and a step holds 3 micro-batches of tokens."""
    from tokenmill.metrics.sinks import read_jsonl

    results = run_ranks(_pp_grad_accum_run, 2, str(tmp_path / "run"), 3, 2, timeout=240)
    for r in results:
        assert r["code"] == 0
        assert r["calls"] == [1] * 6  # 2 steps x 3 micro-steps, data-parallel size 1
    startup = read_jsonl(tmp_path / "run" / "metrics.jsonl", "startup")[0]["training"]
    assert (startup["grad_accum"], startup["data_parallel"], startup["tokens_per_step"]) == (3, 1, 3 * 4 * 32)
    summary = read_jsonl(tmp_path / "run" / "metrics.jsonl", "summary")[-1]
    assert (summary["steps"], summary["tokens_seen"]) == (2, 2 * 3 * 4 * 32)

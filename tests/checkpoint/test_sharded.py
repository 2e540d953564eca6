"""C6: sharded (DCP) checkpoints reshard across world sizes and strategies, save atomically and asynchronously,
load safely, and consolidate into one safetensors file."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import full_params, run_loop, run_ranks, tiny_config
from tokenmill.checkpoint.folder import verify_folder
from tokenmill.errors import UserError
from tokenmill.checkpoint import sharded as dcp

FIRST, SECOND = 3, 2  # steps before and after the checkpoint


@pytest.fixture(scope="module")
def reference() -> dict:
    out = run_loop(tiny_config("single"), FIRST + SECOND)
    return {"losses": out["losses"]}


def _train_save_continue(strategy: str, pp: int, ckpt: str, async_save: bool) -> dict:
    """Train FIRST steps, save (async: keep training while it writes), train SECOND more steps."""
    cfg = tiny_config(strategy, pp, "GPipe", 4 if pp > 1 else 2)
    out = run_loop(cfg, FIRST)
    saver = dcp.ShardedSaver(async_save=async_save)
    saver.save(ckpt, out["engine"].model, out["opt"], step=FIRST, extra_state={"step": FIRST})
    more = run_loop(cfg, SECOND, start=FIRST, engine_and_opt=(out["engine"], out["opt"]))
    saver.close()
    return {"losses": out["losses"] + more["losses"]}


def _load_continue(strategy: str, pp: int, ckpt: str) -> dict:
    """Fresh model + optimizer in this layout, load the checkpoint, train SECOND steps."""
    from tokenmill.model import build_model
    from tokenmill.optim.optimizers import build_optimizer
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config(strategy, pp, "GPipe", 4 if pp > 1 else 2)
    dist = init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    engine = Engine(build_model(cfg.model), cfg, dist, Precision("fp32", dist.device))
    opt = engine.build_optimizer(lambda m: build_optimizer(m, cfg.optim))
    extra = dcp.load_sharded(ckpt, engine.model, opt)
    out = run_loop(cfg, SECOND, start=FIRST, engine_and_opt=(engine, opt))
    return {"losses": out["losses"], "extra": extra, "params": full_params(engine)}


def test_fsdp_two_ranks_async_to_single_process(tmp_path, reference):
    ckpt = tmp_path / "ckpt" / "step_00000003"
    saved = run_ranks(_train_save_continue, 2, "fsdp", 1, str(ckpt), True, timeout=120)
    # async save overlapped 2 more steps, which still follow the uninterrupted run
    assert saved[0]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    verify_folder(ckpt)  # manifest lists every shard; sizes and sha256 match
    assert dcp.is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_00000003"]  # no .tmp- left behind
    assert len(list(ckpt.glob("*.distcp"))) == 2
    # load in one process (the state at save time, not after the 2 overlapped steps)
    resumed = _load_continue("single", 1, str(ckpt))
    assert resumed["extra"] == {"step": FIRST}
    assert resumed["losses"] == pytest.approx(reference["losses"][FIRST:], abs=1e-5)


def test_single_process_to_fsdp_and_pipeline(tmp_path, reference):
    ckpt = tmp_path / "step_00000003"
    single = _train_save_continue("single", 1, str(ckpt), False)
    assert single["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    for strategy, pp in (("fsdp", 1), ("single", 2)):
        resumed = run_ranks(_load_continue, 2, strategy, pp, str(ckpt), timeout=120)
        for r in resumed:
            assert r["losses"] == pytest.approx(reference["losses"][FIRST:], abs=1e-5), (strategy, pp)


def test_pipeline_save_consolidate(tmp_path):
    ckpt = tmp_path / "step_00000003"
    run_ranks(_train_save_continue, 2, "single", 2, str(ckpt), False, timeout=120)
    out = dcp.consolidate(ckpt, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    merged = load_file(str(out))
    loaded = _load_continue("single", 1, str(ckpt))  # the params after 2 more steps: must differ
    model_keys = set(tiny_model_keys())
    assert set(merged) == model_keys
    # consolidated weights = what load_sharded restores (re-load without continuing)
    from tokenmill.model import build_model

    model = build_model(tiny_config().model)
    dcp.load_sharded(ckpt, model)
    for k, v in model.state_dict().items():
        assert torch.equal(merged[k], v), k
    assert any(not torch.equal(merged[k], loaded["params"][k]) for k in merged)


def tiny_model_keys() -> list[str]:
    from tokenmill.model import build_model

    return list(build_model(tiny_config().model).state_dict())


def test_bad_inputs(tmp_path):
    from tokenmill.model import build_model
    from tokenmill.model.config import ModelConfig

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="not a sharded checkpoint"):
        dcp.load_sharded(plain, build_model(tiny_config().model))
    with pytest.raises(UserError, match="not a sharded checkpoint"):
        dcp.consolidate(plain, tmp_path / "x.safetensors")
    ckpt = tmp_path / "step_00000001"
    dcp.save_sharded(ckpt, build_model(tiny_config().model), None, step=1)
    other = ModelConfig(**{**tiny_config().model.__dict__, "d_model": 64})
    with pytest.raises(UserError, match="does not fit"):
        dcp.load_sharded(ckpt, build_model(other))


def test_consolidate_cli(tmp_path):
    from safetensors.torch import load_file

    from tokenmill.cli import main
    from tokenmill.model import build_model

    model = build_model(tiny_config().model)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    dcp.save_sharded(ckpt, model, None, step=1)
    out = tmp_path / "model.safetensors"
    assert main(["checkpoint", "consolidate", str(tmp_path / "run"), str(out)]) == 0  # run folder: latest
    merged = load_file(str(out))
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert main(["checkpoint", "consolidate", str(ckpt), str(tmp_path / "model.bin")]) == 2
    (ckpt / "__0_0.distcp").write_bytes(b"damaged")
    assert main(["checkpoint", "consolidate", str(ckpt), str(tmp_path / "again.safetensors")]) == 2
    assert not (tmp_path / "again.safetensors").exists()

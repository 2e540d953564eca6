"""Sharded (DCP) checkpoints through the Checkpointer: they reshard across world sizes and strategies, save
atomically and asynchronously, load safely, and consolidate into one safetensors file or loadable folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_helpers import full_params, run_loop, run_ranks, tiny_config
from tokenmill.checkpoint.config import CheckpointConfig
from tokenmill.checkpoint.find import find_checkpoint
from tokenmill.checkpoint.folder import verify_folder
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.parts import ModelState, OptimizerState
from tokenmill.checkpoint.sharded import consolidate
from tokenmill.errors import UserError
from tokenmill.train.state import TrainState

FIRST, SECOND = 3, 2  # steps before and after the checkpoint


@pytest.fixture(scope="module")
def reference() -> dict:
    out = run_loop(tiny_config("single"), FIRST + SECOND)
    return {"losses": out["losses"]}


def engine_checkpointer(run_dir: str, engine, opt, state: TrainState, async_save: bool = False) -> Checkpointer:
    """The parts the training loop gives its Checkpointer, for an Engine of the dist_helpers loop."""
    parts = {
        "model": ModelState(engine.model, sharded=engine.sharded),
        "optimizer": OptimizerState(opt, engine.optimizer_state_dict),
        "train": state,
    }
    return Checkpointer(run_dir, CheckpointConfig(async_save=async_save), parts, dist=engine.dist)


def _train_save_continue(strategy: str, pp: int, run_dir: str, async_save: bool) -> dict:
    """Train FIRST steps, save (async: keep training while it writes), train SECOND more steps."""
    cfg = tiny_config(strategy, pp, "GPipe", 4 if pp > 1 else 2)
    out = run_loop(cfg, FIRST)
    ck = engine_checkpointer(run_dir, out["engine"], out["opt"], TrainState(step=FIRST), async_save)
    path = ck.save(FIRST)
    more = run_loop(cfg, SECOND, start=FIRST, engine_and_opt=(out["engine"], out["opt"]))
    ck.close()
    return {"losses": out["losses"] + more["losses"], "path": str(path), "sharded": out["engine"].sharded}


def _load_continue(strategy: str, pp: int, path: str) -> dict:
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
    state = TrainState()
    engine_checkpointer(Path(path).parent.parent, engine, opt, state).load(path)
    out = run_loop(cfg, SECOND, start=FIRST, engine_and_opt=(engine, opt))
    return {"losses": out["losses"], "step": state.step, "params": full_params(engine)}


def test_fsdp_two_ranks_async_to_single_process(tmp_path, reference):
    saved = run_ranks(_train_save_continue, 2, "fsdp", 1, str(tmp_path), True, timeout=120)
    ckpt = tmp_path / "checkpoints" / f"step_{FIRST:08d}"
    assert saved[0]["sharded"] and saved[0]["path"] == str(ckpt)
    # async save overlapped 2 more steps, which still follow the uninterrupted run
    assert saved[0]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    verify_folder(ckpt)  # manifest lists every shard; sizes and sha256 match
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]  # no .tmp- or .shards- left behind
    assert len(list(ckpt.glob("*.distcp"))) == 2
    # load in one process (the state at save time, not after the 2 overlapped steps)
    resumed = _load_continue("single", 1, str(ckpt))
    assert resumed["step"] == FIRST
    assert resumed["losses"] == pytest.approx(reference["losses"][FIRST:], abs=1e-5)


def test_single_process_to_fsdp_and_pipeline(tmp_path, reference):
    single = _train_save_continue("single", 1, str(tmp_path), False)
    assert single["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    assert not single["sharded"] and (tmp_path / "checkpoints" / f"step_{FIRST:08d}" / "model.safetensors").is_file()
    for strategy, pp in (("fsdp", 1), ("single", 2)):
        resumed = run_ranks(_load_continue, 2, strategy, pp, single["path"], timeout=120)
        for r in resumed:
            assert r["losses"] == pytest.approx(reference["losses"][FIRST:], abs=1e-5), (strategy, pp)


def test_pipeline_save_consolidate(tmp_path):
    from safetensors.torch import load_file

    from tokenmill.model import build_model

    saved = run_ranks(_train_save_continue, 2, "single", 2, str(tmp_path), False, timeout=120)
    ckpt = find_checkpoint(tmp_path)
    assert saved[0]["sharded"] and str(ckpt) == saved[0]["path"]
    merged = load_file(str(consolidate(ckpt, tmp_path / "model.safetensors")))
    loaded = _load_continue("single", 1, str(ckpt))  # the params after 2 more steps: must differ
    assert set(merged) == set(build_model(tiny_config().model).state_dict())
    # consolidated weights = what a plain model loads from the shards
    model = build_model(tiny_config().model)
    Checkpointer(tmp_path, parts={"model": model}).load(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(merged[k], v), k
    assert any(not torch.equal(merged[k], loaded["params"][k]) for k in merged)


def _sharded_run(tmp_path, model=None):
    """A run folder whose one checkpoint is sharded (saved in one process, as FSDP ranks would)."""
    from tokenmill.model import build_model

    cfg = tiny_config()
    model = model if model is not None else build_model(cfg.model)
    run = tmp_path / "run"
    path = Checkpointer(run, parts={"model": ModelState(model, sharded=True)}, run_config=cfg).save(1)
    return run, path, model


def test_shards_that_do_not_fit_the_model_are_one_line(tmp_path):
    from tokenmill.model import build_model
    from tokenmill.model.config import ModelConfig

    run, path, _ = _sharded_run(tmp_path)
    other = ModelConfig(**{**tiny_config().model.__dict__, "d_model": 64})
    with pytest.raises(UserError, match="does not fit"):
        Checkpointer(run, parts={"model": ModelState(build_model(other), sharded=True)}).load(path)


def test_consolidate_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    import tokenmill
    from tokenmill.cli import main

    run, ckpt, model = _sharded_run(tmp_path)
    out = tmp_path / "model.safetensors"
    assert main(["checkpoint", "consolidate", str(run), str(out)]) == 0  # run folder: its latest
    merged = load_file(str(out))
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    # a folder output is a checkpoint that load_model reads (a sharded one it refuses, naming this command)
    with pytest.raises(UserError, match="checkpoint consolidate"):
        tokenmill.load_model(ckpt)
    folder = tmp_path / "single"
    assert main(["checkpoint", "consolidate", str(ckpt), str(folder)]) == 0
    loaded = tokenmill.load_model(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    capsys.readouterr()


def test_consolidate_keeps_an_existing_output_unless_forced(tmp_path, capsys):
    from tokenmill.cli import main

    run, ckpt, model = _sharded_run(tmp_path)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"someone else's weights")
    assert main(["checkpoint", "consolidate", str(ckpt), str(other)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--force" in lines[0]
    assert other.read_bytes() == b"someone else's weights"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["checkpoint", "consolidate", str(ckpt), str(mine), "--force"]) == 2  # not a checkpoint: kept
    assert (mine / "notes.txt").read_text() == "mine"
    assert main(["checkpoint", "consolidate", str(ckpt), str(other), "--force"]) == 0
    assert other.read_bytes() != b"someone else's weights"
    capsys.readouterr()


@pytest.mark.parametrize("case", ["damaged shard", "not sharded", "missing", "empty run"])
def test_consolidate_bad_inputs(tmp_path, capsys, case):
    from tokenmill.cli import main

    run, ckpt, _ = _sharded_run(tmp_path)
    source = ckpt
    if case == "damaged shard":
        next(ckpt.glob("*.distcp")).write_bytes(b"damaged")
    elif case == "not sharded":
        source = Checkpointer(tmp_path / "plain", parts={"model": torch.nn.Linear(2, 2)}).save(1)
    elif case == "missing":
        source = tmp_path / "nowhere"
    else:
        source = tmp_path / "empty"
        (source / "checkpoints").mkdir(parents=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out.safetensors"
    assert main(["checkpoint", "consolidate", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

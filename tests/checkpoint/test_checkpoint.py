"""Checkpoints: exact round trip of every part, safe loading, crash safety, damage detection, retention."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from tokenmill.checkpoint import values as checkpoint_values
from tokenmill.checkpoint.config import CheckpointConfig
from tokenmill.checkpoint.find import find_checkpoint
from tokenmill.checkpoint.folder import write_manifest
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.parts import ModelState
from tokenmill.checkpoint.weights import read_weights
from tokenmill.errors import UserError
from tokenmill.parallel.dist import DistInfo
from tokenmill.train.stability import DivergenceDetector
from tokenmill.train.state import TrainState


class TinyLM(nn.Module):
    """Embedding + linear head, optionally tied, shaped like the real model's keys."""

    def __init__(self, vocab: int = 11, d: int = 8, tie: bool = True) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.tok_emb(idx))))


class FakeLoader:
    def __init__(self) -> None:
        self.cursor = 0
        self.buffer = np.arange(3, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]
        self.buffer = state["buffer"].numpy()


def make(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM(tie=tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, FakeLoader()


def parts_of(model, opt=None, sched=None, loader=None, train=None, detector=None) -> dict:
    given = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "loader": loader,
        "train": train,
        "detector": detector,
    }
    return {name: part for name, part in given.items() if part is not None}


def train_steps(model, opt, sched, loader, n: int) -> None:
    for _ in range(n):
        idx = torch.randint(0, 11, (2, 5))
        loss = model(idx).logsumexp(-1).mean() + 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        loader.cursor += 1
        loader.buffer = loader.buffer + 1


def cfg(keep_last: int = 3, keep_best: int = 1) -> CheckpointConfig:
    return CheckpointConfig(keep_last=keep_last, keep_best=keep_best)


def checkpointer(tmp_path, *objects, keep_last: int = 3, keep_best: int = 1, **kwargs) -> Checkpointer:
    return Checkpointer(tmp_path, cfg(keep_last, keep_best), parts_of(*objects), **kwargs)


def test_round_trip_is_bitwise_and_continues_identically(tmp_path):
    model, opt, sched, loader = make()
    train_steps(model, opt, sched, loader, 3)
    state = TrainState(step=3, tokens_seen=30, best_eval_loss=1.5)
    detector = DivergenceDetector(1.0, 0.1, 0.01, 0, fast=2.5, slow=2.6, seen=3)
    ck = checkpointer(
        tmp_path,
        model,
        opt,
        sched,
        loader,
        state,
        detector,
        run_config={"model": {"d_model": 8}},
        tokenizer_json='{"stands": "for a tokenizer"}',
    )
    path = ck.save(3)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "manifest.json",
        "meta.json",
        "model.safetensors",
        "state.pt",
        "tokenizer.json",
    ]
    assert "tokenizer.json" in json.loads((path / "manifest.json").read_text())["files"]
    # Reference: continue the original run two more steps.
    train_steps(model, opt, sched, loader, 2)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()

    model2, opt2, sched2, loader2 = make(seed=123)  # different init: the load must overwrite everything
    state2, detector2 = TrainState(), DivergenceDetector(1.0, 0.1, 0.01, 0)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    info = checkpointer(tmp_path, model2, opt2, sched2, loader2, state2, detector2).load(path)
    assert info["step"] == 3 and info["path"] == path
    assert (state2.step, state2.tokens_seen, state2.best_eval_loss) == (3, 30, 1.5)
    assert detector2.state_dict() == {"fast": 2.5, "slow": 2.6, "seen": 3}
    assert loader2.cursor == 3 and loader2.buffer.tolist() == [3, 4, 5]
    assert sched2.last_epoch == 3
    train_steps(model2, opt2, sched2, loader2, 2)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, ref[key]), key
    for pid, st in opt2.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, ref_opt["state"][pid][name]), (pid, name)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_state_pt_loads_with_weights_only_and_meta_is_complete(tmp_path):
    model, opt, sched, loader = make()
    train_steps(model, opt, sched, loader, 1)
    path = checkpointer(tmp_path, model, opt, sched, loader, TrainState(step=1, tokens_seen=10)).save(1)
    blob = torch.load(path / "state.pt", weights_only=True)
    assert set(blob) == {"format_version", "step", "eval_loss", "rng", "parts"}
    assert set(blob["parts"]) == {"optimizer", "scheduler", "loader", "train"}  # the model is in safetensors
    assert isinstance(blob["rng"]["numpy"]["key"], torch.Tensor) and isinstance(blob["rng"]["python"]["internal"], list)
    meta = json.loads((path / "meta.json").read_text())
    assert {"tokenmill", "torch", "python", "git_commit", "time", "step", "tokens_seen", "sharded"} <= set(meta)
    assert meta["tokens_seen"] == 10 and meta["sharded"] is False


def test_unsafe_part_state_is_refused_with_its_path(tmp_path):
    class Odd:
        def state_dict(self):
            return {"bad": object()}

        def load_state_dict(self, state):
            pass

    model, *_ = make()
    with pytest.raises(TypeError, match=r"parts\.odd\.bad"):
        Checkpointer(tmp_path, cfg(), {"model": model, "odd": Odd()}).save(1)
    assert not list((tmp_path / "checkpoints").glob("step_*"))
    with pytest.raises(TypeError, match="load_state_dict"):
        Checkpointer(tmp_path, cfg(), {"model": model, "lr": 0.1})
    with pytest.raises(TypeError, match="ModelState"):
        Checkpointer(tmp_path, cfg(), {"model": FakeLoader()})


def test_tied_weights_saved_once_and_stay_tied(tmp_path):
    model, *_ = make(tie=True)
    path = checkpointer(tmp_path, model).save(1)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert "tok_emb.weight" in handle.keys() and "head.weight" not in handle.keys()  # noqa: SIM118 (not a dict)
    fresh, *_ = make(tie=True, seed=5)
    checkpointer(tmp_path, fresh).load(path)
    assert fresh.head.weight is fresh.tok_emb.weight
    assert torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    weights = read_weights(path)
    assert torch.equal(weights["head.weight"], weights["tok_emb.weight"])


def test_wrapper_prefixes_are_stripped(tmp_path):
    model, *_ = make(tie=False)
    wrapped = nn.DataParallel(torch.compile(model))  # DDP's `module.` naming on CPU; compile wraps lazily
    assert any(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    path = checkpointer(tmp_path, wrapped).save(1)
    assert set(read_weights(path)) == {"tok_emb.weight", "proj.weight", "proj.bias", "head.weight"}
    fresh = nn.DataParallel(torch.compile(make(tie=False, seed=3)[0]))
    checkpointer(tmp_path, fresh).load(path)
    assert torch.equal(fresh.module._orig_mod.proj.weight, model.proj.weight)


def test_changed_model_shape_names_the_keys(tmp_path):
    model, *_ = make()
    path = checkpointer(tmp_path, model, run_config={"model": {"vocab_size": 11, "d_model": 8}}).save(1)
    other = TinyLM(vocab=13, d=8)
    other.extra = nn.Linear(2, 2)
    with pytest.raises(UserError) as err:
        checkpointer(tmp_path, other, run_config={"model": {"vocab_size": 13, "d_model": 8}}).load(path)
    message = str(err.value)
    assert "tok_emb.weight (11, 8) vs model (13, 8)" in message
    assert "missing keys: extra.bias, extra.weight" in message
    assert "changed: model.vocab_size 11 -> 13" in message
    assert "\n" not in message


def _two_checkpoints(tmp_path):
    model, opt, sched, loader = make()
    ck = checkpointer(tmp_path, model, opt, sched, loader)
    first = ck.save(1)
    train_steps(model, opt, sched, loader, 1)
    second = ck.save(2)
    return ck, first, second


def test_missing_manifest_is_skipped_and_named(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    (second / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        assert find_checkpoint(tmp_path) == first
    with pytest.raises(UserError, match=r"step_00000002 is incomplete: manifest.json is missing"):
        checkpointer(tmp_path, make()[0]).load(second)


def test_flipped_byte_is_detected(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    target = second / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        assert find_checkpoint(tmp_path) == first
    with pytest.raises(UserError, match=r"model.safetensors is damaged \(sha256 mismatch\)"):
        checkpointer(tmp_path, make()[0]).load(second)
    # A truncated file is named too (cheaper size check).
    (first / "state.pt").write_bytes((first / "state.pt").read_bytes()[:10])
    with pytest.raises(UserError, match="state.pt is truncated"):
        Checkpointer(tmp_path).load(first)
    with pytest.raises(UserError, match="no valid checkpoint in"):
        find_checkpoint(tmp_path)


def test_file_the_manifest_does_not_list_makes_the_folder_invalid(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    (second / "notes.txt").write_text("added later")
    with pytest.warns(UserWarning, match="notes.txt, which its manifest.json does not list"):
        assert find_checkpoint(tmp_path) == first
    with pytest.raises(UserError, match="does not list"):
        checkpointer(tmp_path, make()[0]).load(second)


@pytest.mark.parametrize("damage", ["state.pt", "safetensors header"])
def test_damage_behind_a_matching_manifest_is_one_line(tmp_path, damage):
    """A file damaged before its manifest was computed passes the checksums; reading it must still fail cleanly."""
    ck, first, second = _two_checkpoints(tmp_path)
    if damage == "state.pt":
        target = second / "state.pt"
        target.write_bytes(b"PK\x03\x04" + bytes(64))  # a zip signature, then nothing torch can read
    else:
        target = second / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[8:16] = b"\xff" * 8  # the JSON header no longer parses
        target.write_bytes(bytes(data))
    write_manifest(second, 2)  # the manifest now matches the damaged file
    model, opt, sched, loader = make()
    with pytest.raises(UserError) as err:
        checkpointer(tmp_path, model, opt, sched, loader).load(second)
    message = str(err.value)
    assert str(target) in message and "use an earlier checkpoint" in message and "\n" not in message


def test_save_killed_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from tokenmill.checkpoint import weights

    ck, first, second = _two_checkpoints(tmp_path)
    before = (second / "model.safetensors").read_bytes()
    original = weights.write_safetensors
    calls = []

    def dies_after_weights(handle, tensors, metadata):
        original(handle, tensors, metadata)
        calls.append(1)
        raise KeyboardInterrupt  # killed after half the files

    monkeypatch.setattr(weights, "write_safetensors", dies_after_weights)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3)
    assert calls, "the injected failure did not run"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002"]
    assert (second / "model.safetensors").read_bytes() == before
    assert find_checkpoint(tmp_path) == second
    # A hard kill (no cleanup) leaves a tmp folder: never chosen, and removed by the next save.
    stale = tmp_path / "checkpoints" / ".tmp-step_00000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert find_checkpoint(tmp_path) == second
    with pytest.raises(UserError, match="unfinished checkpoint"):
        find_checkpoint(stale)
    monkeypatch.undo()
    ck.save(3)
    assert not stale.exists()


def test_disk_full_gives_clear_error_and_keeps_previous(tmp_path, monkeypatch):
    ck, first, second = _two_checkpoints(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tokenmill.checkpoint.manager.torch.save", full)
    with pytest.raises(
        UserError,
        match=r"disk full while saving checkpoint to .*step_00000003: free space or lower "
        r"checkpoint.keep_last",
    ):
        ck.save(3)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step_00000001", "step_00000002"]
    monkeypatch.undo()
    assert find_checkpoint(tmp_path) == second


def test_disk_full_inside_torch_save_writer(tmp_path, monkeypatch):
    """torch.save wraps a failing file write in a RuntimeError; it must still read as disk full."""
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullFile(handle) if str(path).endswith("state.pt") and "w" in mode else handle

    model, *_ = make()
    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(UserError, match="disk full"):
        checkpointer(tmp_path, model).save(1)
    monkeypatch.undo()
    assert not any((tmp_path / "checkpoints").iterdir())


def test_retention_keeps_last_k_and_best(tmp_path):
    model, *_ = make()
    ck = checkpointer(tmp_path, model, keep_last=2, keep_best=1)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None, 6: 2.2}
    for step, loss in losses.items():
        assert (ck.is_best(loss) if loss is not None else False) == (step in (1, 2))
        ck.save(step, eval_loss=loss)
    assert [p.name for p in ck.list_checkpoints()] == ["step_00000002", "step_00000005", "step_00000006"]
    assert find_checkpoint(tmp_path, "best").name == "step_00000002"
    assert json.loads((ck.dir / "best.json").read_text())["step"] == 2
    assert find_checkpoint(tmp_path).name == "step_00000006"
    assert not [p for p in ck.dir.iterdir() if p.name.startswith(".")]  # deletions leave nothing behind


def test_retention_killed_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """A deletion is a rename then a delete: a kill leaves `.del-*` (cleaned by the next save), never a
    `step_*` folder with some files gone. Half-deleted folders an older version left are removed too."""
    import shutil

    from tokenmill.checkpoint import folder

    model, *_ = make()
    ck = checkpointer(tmp_path, model, keep_last=1, keep_best=0)
    ck.save(1)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if ".del-" in str(path):
            for child in sorted(path.iterdir())[:2]:  # some files gone, then the process dies
                child.unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(folder.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2)  # step 2 is published, then retention deletes step 1 and is killed
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints()] == ["step_00000002"]
    assert (ck.dir / ".del-step_00000001").is_dir()
    assert find_checkpoint(tmp_path).name == "step_00000002"
    half = ck.dir / "step_00000000"  # what a kill in an older tokenmill's retention left: no manifest
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    ck.save(3)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step_00000003"]


def test_interrupted_swap_of_a_resaved_step_gets_its_name_back(tmp_path):
    model, *_ = make()
    ck = checkpointer(tmp_path, model)
    first = ck.save(1)
    first.rename(ck.dir / ".old-step_00000001")  # killed between the two renames of a re-save
    ck.save(2)
    assert [p.name for p in ck.list_checkpoints()] == ["step_00000001", "step_00000002"]
    assert find_checkpoint(first) == first


def test_resave_same_step_replaces_it(tmp_path):
    model, *_ = make()
    ck = checkpointer(tmp_path, model)
    ck.save(4)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    path = ck.save(4)
    assert torch.equal(read_weights(path)["proj.weight"], model.proj.weight)
    assert [p.name for p in ck.dir.iterdir()] == ["step_00000004"]


def test_checkpoint_saved_before_parts_had_names_still_loads(tmp_path):
    """state.pt format 1 (optimizer, scheduler, loader, train_state at the top, the rest under `extra`)."""
    model, opt, sched, loader = make()
    train_steps(model, opt, sched, loader, 2)
    path = checkpointer(tmp_path, model).save(2)
    old = {
        "format_version": 1,
        "step": 2,
        "train_state": {"step": 2, "tokens_seen": 20},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "loader": loader.state_dict(),
        "rng": checkpoint_values.capture_rng(),
        "extra": {"detector": {"fast": 1.0, "slow": 2.0, "seen": 2}},
        "eval_loss": None,
    }
    torch.save(checkpoint_values.to_safe(old), path / "state.pt")
    write_manifest(path, 2)
    model2, opt2, sched2, loader2 = make(seed=7)
    state, detector = TrainState(), DivergenceDetector(1.0, 0.1, 0.01, 0)
    checkpointer(tmp_path, model2, opt2, sched2, loader2, state, detector).load(path)
    assert (state.step, state.tokens_seen, detector.seen, loader2.cursor, sched2.last_epoch) == (2, 20, 2, 2, 2)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_weights_only_folder_is_refused_for_resume(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    (second / "state.pt").unlink()
    write_manifest(second, 2)
    with pytest.raises(UserError, match="holds weights only"):
        checkpointer(tmp_path, make()[0]).load(second)


def test_find_checkpoint_choices(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="neither a checkpoint folder"):
        find_checkpoint(tmp_path)
    ck, first, second = _two_checkpoints(tmp_path)
    assert find_checkpoint(tmp_path) == second
    assert find_checkpoint(tmp_path / "checkpoints") == second
    assert find_checkpoint(first) == first
    with pytest.raises(UserError, match="no valid checkpoint with an eval loss"):
        find_checkpoint(tmp_path, "best")
    with pytest.raises(UserError, match="which="):
        find_checkpoint(tmp_path, "worst")


def _two_rank_save_load(run_dir: str) -> dict:
    import torch.distributed as tdist

    import tokenmill.checkpoint.manager
    from tokenmill.parallel.config import ParallelConfig
    from tokenmill.parallel.dist import init_distributed

    dist = init_distributed(ParallelConfig(strategy="ddp"), "cpu")
    model, opt, sched, loader = make()
    loader.cursor = 10 + dist.rank  # each rank reads its own part of the data
    torch.manual_seed(100 + dist.rank)
    ck = Checkpointer(run_dir, cfg(), parts_of(model, opt, sched, loader), dist=dist)
    path = ck.save(5)
    expected = torch.rand(3)
    loader.cursor = -1
    torch.manual_seed(0)
    info = ck.load(path)
    out = {"cursor": loader.cursor, "rng_ok": torch.equal(torch.rand(3), expected), "step": info["step"]}
    # Rank 0's disk fills up during the next save: every rank must raise, none may hang.
    if dist.rank == 0:

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        tokenmill.checkpoint.manager.write_manifest = full
    try:
        ck.save(6)
    except UserError as err:
        out["error"] = str(err)
    tdist.barrier()
    return out


def test_two_ranks_keep_their_own_state_and_fail_together(tmp_path):
    from dist_helpers import run_ranks

    results = run_ranks(_two_rank_save_load, 2, str(tmp_path), timeout=120)
    assert [r["cursor"] for r in results] == [10, 11]
    assert all(r["rng_ok"] and r["step"] == 5 for r in results)
    assert all("disk full while saving checkpoint" in r.get("error", "") for r in results)
    assert [p.name for p in Checkpointer(tmp_path).list_checkpoints()] == ["step_00000005"]
    rank2 = DistInfo(rank=2, world_size=3, local_rank=2, device=torch.device("cpu"), backend=None)
    model, opt, sched, loader = make()
    with pytest.raises(UserError, match="same number of processes"):
        Checkpointer(tmp_path, cfg(), parts_of(model, opt, sched, loader), dist=rank2).load(
            tmp_path / "checkpoints" / "step_00000005"
        )


def test_sharded_model_part_saves_dcp_shards_in_one_process(tmp_path):
    """FSDP / pipeline runs: model + optimizer go through DCP; the manifest covers the shards and meta.json
    says the folder is sharded (the only way the loader takes that path)."""
    model, opt, sched, _ = make()
    train_steps(model, opt, sched, FakeLoader(), 1)
    ck = Checkpointer(
        tmp_path,
        cfg(),
        {"model": ModelState(model, sharded=True), "optimizer": opt, "scheduler": sched, "train": TrainState(step=4)},
    )
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = ck.save(4, reason="interval")
    assert (path / ".metadata").is_file() and not (path / "model.safetensors").exists()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["sharded"] is True and meta["reason"] == "interval"
    assert ".metadata" in json.loads((path / "manifest.json").read_text())["files"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = TrainState()
    Checkpointer(
        tmp_path,
        cfg(),
        {"model": ModelState(model, sharded=True), "optimizer": opt, "scheduler": sched, "train": state},
    ).load(path)
    assert state.step == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # a plain (non-sharded) run reads the same shards into its own layout
    plain, *_ = make(seed=9)
    checkpointer(tmp_path, plain).load(path)
    assert torch.equal(plain.proj.weight, model.proj.weight)


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = checkpoint_values.to_safe(checkpoint_values.capture_rng())
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    checkpoint_values.restore_rng(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


KILL_SCRIPT = """
import sys, time, torch
import tokenmill.checkpoint.weights as weights
from tokenmill.checkpoint.manager import Checkpointer
from torch import nn
real = weights.write_safetensors
def slow(handle, tensors, metadata):
    real(handle, tensors, metadata)
    handle.flush()
    open(sys.argv[2], "w").close()  # tell the parent: half the files are on disk
    time.sleep(60)
weights.write_safetensors = slow
torch.manual_seed(0)
Checkpointer(sys.argv[1], parts={"model": nn.Linear(64, 64)}).save(3)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    ck, first, second = _two_checkpoints(tmp_path)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the saving process did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = tmp_path / "checkpoints" / ".tmp-step_00000003"
    assert (partial / "model.safetensors").is_file() and not (tmp_path / "checkpoints" / "step_00000003").exists()
    assert find_checkpoint(tmp_path) == second
    model, opt, sched, loader = make()
    assert checkpointer(tmp_path, model, opt, sched, loader).load(second)["step"] == 2


@pytest.mark.gpu
def test_cuda_model_and_rng_round_trip(tmp_path):
    model = TinyLM().cuda()
    torch.cuda.manual_seed(5)
    path = checkpointer(tmp_path, model).save(1)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(9)
    fresh = TinyLM(vocab=11).cuda()
    checkpointer(tmp_path, fresh).load(path)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert torch.equal(fresh.proj.weight, model.proj.weight) and fresh.proj.weight.is_cuda

"""Checkpoints: exact round trip, safe loading, crash safety, damage detection, retention, resume choice."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from tokenmill.checkpoint import state as checkpoint_state
from tokenmill.checkpoint.manager import Checkpointer, prepare_run_dir, read_weights, resolve_resume
from tokenmill.errors import UserError
from tokenmill.checkpoint.config import CheckpointConfig


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


def save(ck: Checkpointer, step: int, model, opt=None, sched=None, loader=None, eval_loss=None):
    return ck.save(step, {"tokens_seen": step * 10, "best_eval_loss": 1.5}, model, opt, sched, loader,
                   {"detector": {"fast": 2.5, "slow": 2.6}}, eval_loss=eval_loss)


def test_round_trip_is_bitwise_and_continues_identically(tmp_path):
    model, opt, sched, loader = make()
    train_steps(model, opt, sched, loader, 3)
    ck = Checkpointer(tmp_path, cfg(), config={"model": {"d_model": 8}})
    path = save(ck, 3, model, opt, sched, loader)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "manifest.json", "meta.json",
                                                       "model.safetensors", "state.pt"]
    # Reference: continue the original run two more steps.
    train_steps(model, opt, sched, loader, 2)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()

    model2, opt2, sched2, loader2 = make(seed=123)  # different init: the load must overwrite everything
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    info = ck.load(path, model2, opt2, sched2, loader2)
    assert info["step"] == 3 and info["train_state"]["tokens_seen"] == 30
    assert info["extra"]["detector"] == {"fast": 2.5, "slow": 2.6}
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
    path = save(Checkpointer(tmp_path, cfg()), 1, model, opt, sched, loader)
    blob = torch.load(path / "state.pt", weights_only=True)
    assert set(blob) >= {"optimizer", "scheduler", "loader", "rng", "train_state", "extra", "step"}
    assert isinstance(blob["rng"]["numpy"]["key"], torch.Tensor) and isinstance(blob["rng"]["python"]["internal"],
                                                                                 list)
    meta = json.loads((path / "meta.json").read_text())
    assert {"tokenmill", "torch", "python", "git_commit", "time", "step", "tokens_seen"} <= set(meta)
    assert meta["tokens_seen"] == 10


def test_unsafe_extra_is_refused_with_its_path(tmp_path):
    model, *_ = make()
    with pytest.raises(TypeError, match=r"extra\.bad"):
        Checkpointer(tmp_path).save(1, {}, model, extra={"bad": object()})
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_tied_weights_saved_once_and_stay_tied(tmp_path):
    model, *_ = make(tie=True)
    path = Checkpointer(tmp_path).save(1, {}, model)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert "tok_emb.weight" in handle.keys() and "head.weight" not in handle.keys()
    fresh, *_ = make(tie=True, seed=5)
    Checkpointer(tmp_path).load(path, fresh)
    assert fresh.head.weight is fresh.tok_emb.weight
    assert torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    weights = read_weights(path)
    assert torch.equal(weights["head.weight"], weights["tok_emb.weight"])


def test_wrapper_prefixes_are_stripped(tmp_path):
    model, *_ = make(tie=False)

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (`_orig_mod`)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    class DistributedDataParallel(nn.Module):  # same name and `.module` as torch's DDP
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = DistributedDataParallel(Compiled(model))
    assert any(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    path = Checkpointer(tmp_path).save(1, {}, wrapped)
    keys = set(read_weights(path))
    assert keys == {"tok_emb.weight", "proj.weight", "proj.bias", "head.weight"}
    assert checkpoint_state.clean_key("blocks.0._checkpoint_wrapped_module.attn.q_proj.weight") == \
        "blocks.0.attn.q_proj.weight"
    fresh = DistributedDataParallel(Compiled(make(tie=False, seed=3)[0]))
    Checkpointer(tmp_path).load(path, fresh)
    assert torch.equal(fresh.module._orig_mod.proj.weight, model.proj.weight)


def test_changed_model_shape_names_the_keys(tmp_path):
    model, *_ = make()
    path = Checkpointer(tmp_path, config={"model": {"vocab_size": 11, "d_model": 8}}).save(1, {}, model)
    other = TinyLM(vocab=13, d=8)
    other.extra = nn.Linear(2, 2)
    with pytest.raises(UserError) as err:
        Checkpointer(tmp_path).load(path, other, cfg={"model": {"vocab_size": 13, "d_model": 8}})
    message = str(err.value)
    assert "tok_emb.weight (11, 8) vs model (13, 8)" in message
    assert "missing keys: extra.bias, extra.weight" in message
    assert "changed: model.vocab_size 11 -> 13" in message
    assert "\n" not in message


def _two_checkpoints(tmp_path):
    model, opt, sched, loader = make()
    ck = Checkpointer(tmp_path, cfg())
    first = save(ck, 1, model, opt, sched, loader)
    train_steps(model, opt, sched, loader, 1)
    second = save(ck, 2, model, opt, sched, loader)
    return ck, first, second


def test_missing_manifest_is_skipped_and_named(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    (second / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        assert Checkpointer(tmp_path).latest_valid() == first
    with pytest.raises(UserError, match=r"step_00000002 is incomplete: manifest.json is missing"):
        Checkpointer(tmp_path).load(second, make()[0])


def test_flipped_byte_is_detected(tmp_path):
    ck, first, second = _two_checkpoints(tmp_path)
    target = second / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        assert Checkpointer(tmp_path).latest_valid() == first
    with pytest.raises(UserError, match=r"model.safetensors is damaged \(sha256 mismatch\)"):
        Checkpointer(tmp_path).load(second, make()[0])
    # A truncated file is named too (cheaper size check).
    (first / "state.pt").write_bytes((first / "state.pt").read_bytes()[:10])
    with pytest.raises(UserError, match="state.pt is truncated"):
        Checkpointer(tmp_path).load(first)
    with pytest.raises(UserError, match="nothing to resume"):
        resolve_resume(tmp_path, True)


def test_save_killed_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck, first, second = _two_checkpoints(tmp_path)
    before = (second / "model.safetensors").read_bytes()
    original = checkpoint_state.write_safetensors
    calls = []

    def dies_after_weights(handle, tensors, metadata):
        original(handle, tensors, metadata)
        calls.append(1)
        raise KeyboardInterrupt  # killed after half the files

    monkeypatch.setattr("tokenmill.checkpoint.manager.write_safetensors", dies_after_weights)
    model, opt, sched, loader = make()
    with pytest.raises(KeyboardInterrupt):
        save(ck, 3, model, opt, sched, loader)
    assert calls, "the injected failure did not run"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002"]
    assert (second / "model.safetensors").read_bytes() == before
    assert resolve_resume(tmp_path, True) == second
    # A hard kill (no cleanup) leaves a tmp folder: never chosen, and removed by the next save.
    stale = tmp_path / "checkpoints" / ".tmp-step_00000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert resolve_resume(tmp_path, True) == second
    with pytest.raises(UserError, match="unfinished checkpoint"):
        resolve_resume(tmp_path, str(stale))
    monkeypatch.undo()
    save(ck, 3, model, opt, sched, loader)
    assert not stale.exists()


def test_disk_full_gives_clear_error_and_keeps_previous(tmp_path, monkeypatch):
    ck, first, second = _two_checkpoints(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model, opt, sched, loader = make()
    monkeypatch.setattr("tokenmill.checkpoint.manager.torch.save", full)
    with pytest.raises(UserError, match=r"disk full while saving checkpoint to .*step_00000003: free space or lower "
                                        r"checkpoint.keep_last"):
        save(ck, 3, model, opt, sched, loader)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step_00000001", "step_00000002"]
    assert Checkpointer(tmp_path).latest_valid() == second


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
        Checkpointer(tmp_path).save(1, {}, model)
    monkeypatch.undo()
    assert not any((tmp_path / "checkpoints").iterdir())


def test_retention_keeps_last_k_and_best(tmp_path):
    model, *_ = make()
    ck = Checkpointer(tmp_path, cfg(keep_last=2, keep_best=1))
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None, 6: 2.2}
    for step, loss in losses.items():
        assert (ck.is_best(loss) if loss is not None else False) == (step in (1, 2))
        save(ck, step, model, eval_loss=loss)
    assert [p.name for p in ck.list_checkpoints()] == ["step_00000002", "step_00000005", "step_00000006"]
    assert ck.best().name == "step_00000002"
    assert json.loads((ck.dir / "best.json").read_text())["step"] == 2
    assert resolve_resume(tmp_path, True).name == "step_00000006"


def test_resave_same_step_replaces_it(tmp_path):
    model, *_ = make()
    ck = Checkpointer(tmp_path)
    save(ck, 4, model)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    path = save(ck, 4, model)
    assert torch.equal(read_weights(path)["proj.weight"], model.proj.weight)
    assert [p.name for p in ck.dir.iterdir()] == ["step_00000004"]


def test_resolve_resume_choices(tmp_path):
    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path, False) is None
    assert resolve_resume(tmp_path, True) is None  # nothing saved yet: fresh start
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    ck, first, second = _two_checkpoints(tmp_path)
    assert resolve_resume(tmp_path, True) == second
    assert resolve_resume(tmp_path / "elsewhere", str(first)) == first
    assert resolve_resume(tmp_path / "elsewhere", str(tmp_path)) == second


def test_refuse_out_dir_with_another_runs_checkpoints(tmp_path):
    prepare_run_dir(tmp_path)  # empty: fine
    _two_checkpoints(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError, match=r"--resume .* --overwrite"):
        prepare_run_dir(tmp_path)
    assert len(Checkpointer(tmp_path).list_checkpoints()) == 2
    assert prepare_run_dir(tmp_path, resume=True).name == "step_00000002"
    assert len(Checkpointer(tmp_path).list_checkpoints()) == 2
    with pytest.raises(UserError, match="contradict"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    assert prepare_run_dir(tmp_path, overwrite=True, is_main=False) is None
    assert len(Checkpointer(tmp_path).list_checkpoints()) == 2  # only the main process deletes
    prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "tokenizer").is_dir()


def test_old_metrics_without_checkpoints_are_moved_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"}\n')
    prepare_run_dir(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "metrics.1.jsonl").read_text() == '{"kind": "train"}\n'


def _two_rank_save_load(run_dir: str) -> dict:
    import torch.distributed as tdist

    import tokenmill.checkpoint.manager
    from tokenmill.parallel.dist import init_distributed
    from tokenmill.parallel.config import ParallelConfig

    dist = init_distributed(ParallelConfig(strategy="ddp"), "cpu")
    model, opt, sched, loader = make()
    loader.cursor = 10 + dist.rank  # each rank reads its own part of the data
    torch.manual_seed(100 + dist.rank)
    ck = Checkpointer(run_dir, cfg(), dist=dist)
    path = ck.save(5, {"tokens_seen": 50}, model, opt, sched, loader)
    expected = torch.rand(3)
    loader.cursor = -1
    torch.manual_seed(0)
    info = ck.load(path, model, opt, sched, loader)
    out = {"cursor": loader.cursor, "rng_ok": torch.equal(torch.rand(3), expected), "step": info["step"]}
    # Rank 0's disk fills up during the next save: every rank must raise, none may hang.
    if dist.rank == 0:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        tokenmill.checkpoint.manager.write_manifest = full
    try:
        ck.save(6, {"tokens_seen": 60}, model, opt, sched, loader)
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
    with pytest.raises(UserError, match="same number of processes"):
        Checkpointer(tmp_path, rank=2).load(tmp_path / "checkpoints" / "step_00000005")


def test_named_state_and_engine_style_keywords(tmp_path):
    """The training loop's call shape: keyword state pieces come back by name from load()."""
    model, opt, sched, loader = make()

    class Engine:  # the attributes of parallel.engine.Engine that checkpoints use
        sharded = False

        def __init__(self) -> None:
            self.model = model

        def optimizer_state_dict(self, optimizer):
            return optimizer.state_dict()

    ck = Checkpointer(tmp_path, cfg())
    path = ck.save(3, engine=Engine(), optimizer=opt, scheduler=sched, loader=loader, cfg={"model": {"d": 8}},
                   train_state={"step": 3, "tokens_seen": 30}, detector={"fast": 1.0}, scaler={"scale": 2.0},
                   eval_loss=2.5, reason="interval")
    assert ck.last_path == path
    assert json.loads((path / "meta.json").read_text())["reason"] == "interval"
    assert "d: 8" in (path / "config.yaml").read_text()
    info = Checkpointer(tmp_path, cfg()).load(path, engine=Engine(), optimizer=opt, scheduler=sched, loader=loader)
    assert info["detector"] == {"fast": 1.0} and info["scaler"] == {"scale": 2.0}
    assert info["train_state"] == {"step": 3, "tokens_seen": 30}

    class Sharded(Engine):  # FSDP / pipeline runs: model + optimizer go through DCP (parallel/dcp.py)
        sharded = True

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path4 = ck.save(4, engine=Sharded(), optimizer=opt, scheduler=sched, train_state={"step": 4})
    assert (path4 / ".metadata").is_file() and not (path4 / "model.safetensors").exists()
    ck.verify(path4)  # the manifest covers the shard files
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    info = ck.load(path4, engine=Sharded(), optimizer=opt, scheduler=sched)
    assert info["train_state"] == {"step": 4}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = checkpoint_state.to_safe(checkpoint_state.capture_rng())
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    checkpoint_state.restore_rng(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


KILL_SCRIPT = """
import sys, time, torch
import tokenmill.checkpoint.manager as ck
from torch import nn
real = ck.write_safetensors
def slow(handle, tensors, metadata):
    real(handle, tensors, metadata)
    handle.flush()
    open(sys.argv[2], "w").close()  # tell the parent: half the files are on disk
    time.sleep(60)
ck.write_safetensors = slow
torch.manual_seed(0)
ck.Checkpointer(sys.argv[1]).save(3, {}, nn.Linear(64, 64))
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
    assert resolve_resume(tmp_path, True) == second
    model, opt, sched, loader = make()
    assert Checkpointer(tmp_path).load(second, model, opt, sched, loader)["step"] == 2


@pytest.mark.gpu
def test_cuda_model_and_rng_round_trip(tmp_path):
    model = TinyLM().cuda()
    torch.cuda.manual_seed(5)
    path = Checkpointer(tmp_path).save(1, {}, model)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(9)
    fresh = TinyLM(vocab=11).cuda()
    Checkpointer(tmp_path).load(path, fresh)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert torch.equal(fresh.proj.weight, model.proj.weight) and fresh.proj.weight.is_cuda

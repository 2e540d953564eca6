"""Process-group helpers: single-process no-ops, and 2 gloo ranks agreeing through real collectives."""

from __future__ import annotations

import types

import pytest
import torch

from dist_helpers import run_ranks
from tokenmill.errors import UserError
from tokenmill.parallel import dist as tdist


def test_single_process_has_no_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = tdist.init_distributed(types.SimpleNamespace(timeout_s=5), device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert info.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    t = torch.tensor([3.0])
    assert tdist.all_reduce(t, "sum").item() == 3.0
    assert tdist.any_rank(True) and not tdist.any_rank(False)
    tdist.barrier()
    tdist.destroy_distributed()


def test_cuda_device_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="train.device"):
        tdist.resolve_device("cuda:0", 0)


def _two_rank_body() -> dict:
    info = tdist.init_distributed(types.SimpleNamespace(timeout_s=30), device="auto")
    t = torch.tensor([float(info.rank + 1)])
    tdist.all_reduce(t, "sum")
    m = torch.tensor([float(info.rank)])
    tdist.all_reduce(m, "max")
    a = torch.tensor([float(info.rank)])
    tdist.all_reduce(a, "avg")
    name = tdist.broadcast_object(f"from-{info.rank}")
    flag = tdist.any_rank(info.rank == 1)
    tdist.barrier()
    out = {
        "rank": info.rank,
        "world": info.world_size,
        "backend": info.backend,
        "main": info.is_main,
        "sum": t.item(),
        "max": m.item(),
        "avg": a.item(),
        "name": name,
        "flag": flag,
    }
    tdist.destroy_distributed()
    return out


def test_two_gloo_ranks():
    res = run_ranks(_two_rank_body, 2, timeout=60)
    assert [r["rank"] for r in res] == [0, 1]
    assert [r["main"] for r in res] == [True, False]
    for r in res:
        assert r["world"] == 2 and r["backend"] == "gloo"
        assert r["sum"] == 3.0 and r["max"] == 1.0 and r["avg"] == 0.5
        assert r["name"] == "from-0" and r["flag"] is True


def test_stale_store_risk_flags_restarts_with_shared_store(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert tdist.stale_store_risk()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not tdist.stale_store_risk()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not tdist.stale_store_risk()

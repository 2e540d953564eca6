"""Run a function on N gloo ranks (spawned processes) or a command under torchrun, with bounded time.

`run_ranks(fn, world_size, *args)` spawns `world_size` fresh interpreters, sets the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) in each, calls `fn(*args)` and
returns the list of per-rank return values (rank order). A rank that raises fails the call with its
traceback; a hang fails after `timeout` seconds (the children are killed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
        # plain pickle: multiprocessing's pickler would share tensors through handles that die with the child
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except queue_mod.Empty:
        errors.append(f"ranks did not finish within {timeout}s")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def torchrun(
    args: list[str],
    nproc: int = 2,
    timeout: float = 120,
    cwd: str | Path | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node=N [extra] ARGS` on a free localhost port."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *(extra or []),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # own session: on timeout the agent *and* its workers are killed (no orphans left on a shared CI box)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------------
# A minimal training loop over the Engine (phase-1 tests; the real loop is tokenmill.train.loop)

TINY_MODEL = dict(
    n_layers=4, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16, tie_embeddings=False, ffn="mlp", multiple_of=16
)
SEQ = 8
GLOBAL_SEQS = 8  # sequences per optimizer step over the whole job


def tiny_config(
    strategy: str = "single", pp: int = 1, schedule: str = "1F1B", micro_batch: int = 2, **parallel: Any
) -> Any:
    from tokenmill.config import config_from_dict

    return config_from_dict(
        {
            "model": dict(TINY_MODEL),
            "train": {"micro_batch_size": micro_batch, "seq_len": SEQ, "precision": "fp32", "device": "cpu"},
            "optim": {"lr": 1e-2, "fused": False},
            "parallel": {"strategy": strategy, "pp": pp, "pp_schedule": schedule, "timeout_s": 60, **parallel},
        }
    )


def global_batches(steps: int, seed: int = 1) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_MODEL["vocab_size"], (steps, GLOBAL_SEQS, SEQ + 1), generator=g)


def full_params(engine: Any) -> dict:
    """The full (unsharded) parameters on this rank: FSDP gathers; pipeline ranks return their own stages."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if engine.strategy == "fsdp":
        sd = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True))
    else:
        sd = engine.model.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def run_loop(cfg: Any, steps: int, *, clip: float = 1.0, start: int = 0, engine_and_opt: Any = None) -> dict:
    """Train `steps` steps of the fixed global batches; return losses, pre-clip norms, params, and state.

    Rank d of D data-parallel ranks takes rows [d*G/D, (d+1)*G/D) of each global batch and accumulates
    them in micro-batches of train.micro_batch_size: the same tokens, in the same sum, as one process
    accumulating all G rows.
    """
    import torch

    from tokenmill.model import build_meta
    from tokenmill.optim.optimizers import build_optimizer
    from tokenmill.parallel.dist import all_reduce, init_distributed
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    dist = init_distributed(cfg.parallel, "cpu")
    if engine_and_opt is None:
        torch.manual_seed(0)
        # built on meta like the trainer does: the engine initialises it (parallel.init=full)
        engine = Engine(build_meta(cfg.model), cfg, dist, Precision("fp32", dist.device))
        opt = engine.build_optimizer(lambda m: build_optimizer(m, cfg.optim))
    else:
        engine, opt = engine_and_opt
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = global_batches(start + steps)
    per_rank = GLOBAL_SEQS // engine.dp_size
    mbs = cfg.train.micro_batch_size
    accum = per_rank // mbs
    losses, norms = [], []
    for step in range(start, start + steps):
        rows = data[step, engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank]
        total = torch.zeros(())
        for m in range(accum):
            batch = {"tokens": rows[m * mbs : (m + 1) * mbs]}
            total += engine.forward_backward(batch, scaler, denominator=per_rank * SEQ, sync=m == accum - 1)
        losses.append(all_reduce(total, "avg").item())
        norms.append(float(engine.clip_grad_norm(clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "norms": norms, "engine": engine, "opt": opt, "dist": dist}

"""The real `tokenmill train` under torchrun on CPU (gloo, 2 processes): strategies equal one process with
accumulation, sharded checkpoints resume at another world size, a 2-"node" rendezvous, and failures end
(or elastically restart) the job instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_helpers import make_docs, write_jsonl
from dist_helpers import free_port, torchrun
from tokenmill.metrics.sinks import read_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small pre-tokenized corpus: its loader gives rank r windows r, r+W, ... of one global order, so
    W ranks see per step exactly the windows one process accumulates."""
    from tokenmill.cli import main

    root = tmp_path_factory.mktemp("shards")
    src = write_jsonl(root / "docs.jsonl", make_docs(400, max_words=80))
    assert (
        main(
            [
                "prepare",
                str(src),
                "--tokenizer",
                "byte",
                "--out",
                str(root / "data"),
                "--workers",
                "1",
                "--no-progress",
                "--eval-fraction",
                "0.1",
            ]
        )
        == 0
    )
    return root / "data"


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    overrides = [
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_seq_len=32",
        "model.tie_embeddings=false",
        "data.tokenizer=byte",
        f"data.sources=[{shards}]",
        "train.seq_len=16",
        "train.micro_batch_size=2",
        "train.global_batch_tokens=64",
        f"train.max_steps={STEPS}",
        "train.precision=fp32",
        "train.device=cpu",
        "eval.interval_steps=0",
        "eval.max_batches=1",
        "eval.sample_tokens=2",
        "eval.sample_prompts=[a]",
        "schedule.warmup_steps=1",
        "optim.lr=1e-2",
        "log.interval_steps=1",
        "log.progress_bar=false",
        "checkpoint.interval_steps=2",
        "parallel.timeout_s=60",
        f"train.out_dir={out}",
    ]
    return ["train", "--preset", "tiny", *("--" + o for o in overrides), *extra]


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(out / "metrics.jsonl", "train")}


def single(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from train_helpers import subprocess_env

    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *run_args(shards, out, *extra)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln or "what()" in ln]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref")
    ok(single(shards, out))
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1]
    return ref


@pytest.mark.parametrize(
    "extra",
    [
        ["--parallel.strategy=ddp"],
        ["--parallel.strategy=zero1"],
        ["--parallel.strategy=fsdp"],
        ["--parallel.pp=2", "--parallel.pp_schedule=1F1B"],
    ],
    ids=["ddp", "zero1", "fsdp", "pp2-1F1B"],
)
def test_torchrun_matches_single_process(shards, reference, tmp_path, extra):
    ok(torchrun(["-m", "tokenmill", *run_args(shards, tmp_path, *extra)]))
    got = losses(tmp_path)
    assert got == pytest.approx(reference, abs=1e-5)
    final = tmp_path / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "manifest.json").is_file()
    sharded = extra[0] not in ("--parallel.strategy=ddp", "--parallel.strategy=zero1")
    assert (final / ".metadata").is_file() == sharded and (final / "model.safetensors").is_file() != sharded


def test_fsdp_checkpoint_resumes_in_one_process(shards, reference, tmp_path):
    """Save sharded on 2 ranks (async: written while training goes on), resume single-process from the
    mid-run checkpoint: the same later losses."""
    ok(
        torchrun(
            [
                "-m",
                "tokenmill",
                *run_args(shards, tmp_path / "two", "--parallel.strategy=fsdp", "--checkpoint.async_save=true"),
            ]
        )
    )
    mid = tmp_path / "two" / "checkpoints" / "step_00000002"
    ok(single(shards, tmp_path / "one", f"--resume={mid}"))
    got = losses(tmp_path / "one")
    assert sorted(got) == [3, 4]
    assert got == pytest.approx({k: reference[k] for k in (3, 4)}, abs=1e-5)


def test_two_nodes_with_c10d_rendezvous(shards, tmp_path):
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on localhost: one job of 2 ranks trains and checkpoints."""
    from train_helpers import subprocess_env

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=tokenmill-test",
        "-m",
        "tokenmill",
        *run_args(shards, tmp_path, "--parallel.strategy=fsdp"),
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:  # never leave a node waiting at the rendezvous after a failure
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)  # the agent and its worker
                n.wait()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert max(losses(tmp_path)) == STEPS
    assert len(list((tmp_path / "checkpoints" / f"step_{STEPS:08d}").glob("*.distcp"))) == 2
    assert read_jsonl(tmp_path / "metrics.jsonl", "startup")[0]["training"]["data_parallel"] == 2


FAULTY = """
import os, sys
import torch
torch.set_num_threads(1)
from tokenmill.parallel import engine

original = engine.Engine.forward_backward
calls = [0]

def faulty(self, *args, **kwargs):
    calls[0] += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ["RANK"] == "1" and first_attempt and calls[0] == 3:  # step 3 (one micro-step per step)
        raise RuntimeError("injected fault on rank 1 at step 3")
    return original(self, *args, **kwargs)

engine.Engine.forward_backward = faulty
from tokenmill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_rank_failure_ends_the_job(shards, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    started = time.monotonic()
    proc = torchrun([str(script), *run_args(shards, tmp_path / "run", "--parallel.strategy=ddp")], timeout=60)
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 3" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 60  # bounded: no rank waits at a collective for the 60 s timeout
    assert max(losses(tmp_path / "run")) == 2  # steps 1-2 ran, step 3 did not complete


def test_elastic_restart_resumes_from_last_checkpoint(shards, reference, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    # the restarted workers must not read the dead ones' addresses from torchrun's shared store
    # (pytorch/pytorch#135712; docs/scaling.md and deploy/ set the same variable)
    proc = torchrun(
        [str(script), *run_args(shards, tmp_path / "run", "--parallel.strategy=fsdp", "--resume")],
        extra=["--max-restarts=1"],
        timeout=150,
        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    ok(proc)
    assert "injected fault on rank 1 at step 3" in proc.stdout + proc.stderr  # the first attempt did fail
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    resumed = [e for e in events if e["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    # after the restart the run continues from step 2 exactly as an uninterrupted run would
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5)

"""deploy/: the SLURM script and the Kubernetes manifest build torchrun commands a cluster accepts."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
K8S = ROOT / "deploy" / "k8s" / "train-job.yaml"


def torchrun_args(argv: list[str]):
    """Parse what follows `python -m torch.distributed.run` with torchrun's own parser."""
    return get_args_parser().parse_args(argv)


def test_sbatch_builds_a_valid_torchrun_command(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    header = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert any("--ntasks-per-node=1" in ln for ln in header) and any("--gpus-per-node=8" in ln for ln in header)
    # stand-ins for the SLURM tools: record what srun would run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf \'%s\\n\' "$@" > "$RECORD"\n'
        'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE $TORCH_NCCL_ASYNC_ERROR_HANDLING" > '
        '"$RECORD.env"\n'
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "srun.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), "configs/run.yaml", "--parallel.strategy=fsdp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert argv[:3] == ["--kill-on-bad-exit=1", "--ntasks=2", "--ntasks-per-node=1"]
    run_at = argv.index("torch.distributed.run")
    args = torchrun_args(argv[run_at + 1 :])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert args.rdzv_endpoint == "gpu-node-7:29500" and args.rdzv_id == "tokenmill-4242"
    assert args.max_restarts == 3 and args.module
    assert [args.training_script, *args.training_script_args] == [
        "tokenmill",
        "train",
        "configs/run.yaml",
        "--parallel.strategy=fsdp",
        "--resume",
    ]
    assert record.with_suffix(".txt.env").read_text().split() == ["1", "3"]


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    docs = list(yaml.safe_load_all(K8S.read_text()))
    return {d["kind"]: d for d in docs}


def test_k8s_service_and_indexed_job(manifest):
    svc, job = manifest["Service"], manifest["Job"]
    assert svc["apiVersion"] == "v1" and job["apiVersion"] == "batch/v1"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    name = svc["metadata"]["name"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"]) == 8
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in pod["volumes"]} and "dshm" in mounts
    assert svc["spec"]["ports"][0]["port"] == int(env["RDZV_PORT"])


@pytest.mark.parametrize("index", [0, 1])
def test_k8s_command_is_a_valid_torchrun_command(manifest, index):
    job = manifest["Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    script = container["args"][0]
    assert script.startswith("exec python -m torch.distributed.run")
    # let bash expand the variables as in the pod, then print the argv instead of exec'ing
    printed = subprocess.run(
        ["bash", "-c", script.replace("exec python", "printf '%s\\n'", 1)],
        env={**os.environ, **env, "JOB_COMPLETION_INDEX": str(index), "RDZV_ID": "uid-1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    argv = printed.stdout.splitlines()
    assert argv[:2] == ["-m", "torch.distributed.run"], shlex.join(argv)
    args = torchrun_args(argv[2:])
    name = manifest["Service"]["metadata"]["name"]
    assert args.rdzv_endpoint == f"{name}-0.{name}:29500" and args.rdzv_id == "uid-1"
    assert args.nnodes == "2" and args.nproc_per_node == "8" and args.node_rank == index
    assert args.rdzv_conf == f"is_host={1 if index == 0 else 0}"
    assert args.module and args.training_script == "tokenmill" and args.training_script_args[-1] == "--resume"

"""`tokenmill train` on the command line: shortcuts and the demo default map onto the config, and bad input
gets one error line, exit code 2, and leaves every existing file untouched (SPEC principles, issue 4)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tokenmill.cli import build_parser, main
from tokenmill.cli.train import config_from_train_args
from train_helpers import cli_args, events, one_thread  # noqa: F401 (one_thread: autouse fixture)


def parse(argv: list[str]):
    from tokenmill.cli.common import overrides_from_args
    from tokenmill.config import split_overrides

    parser, _ = build_parser(argv[0])
    args, extras = parser.parse_known_args(argv)
    args.overrides = overrides_from_args(args) + split_overrides(extras)
    return args


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under run_dir (checkpoints, metrics, tokenizer cache)."""
    return {
        str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A completed 2-step tiny run in tmp_path/run."""
    run_dir = tmp_path / "run"
    assert main(cli_args(run_dir, 2)) == 0
    capsys.readouterr()
    return run_dir


# ---------------------------------------------------------------------------------------------------------
# the good paths


def test_no_arguments_means_the_demo_preset():
    cfg = config_from_train_args(parse(["train"]))
    assert cfg.train.out_dir == "runs/demo" and cfg.data.tokenizer == "bpe" and cfg.model.n_layers == 4
    assert cfg.train.max_steps > 0 and cfg.data.sources == ["stdlib"]


def test_shortcuts_map_onto_config_keys():
    cfg = config_from_train_args(
        parse(
            [
                "train",
                "--preset",
                "tiny",
                "--lr",
                "0.005",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
                "--grad-accum",
                "3",
                "--max-steps",
                "7",
                "--total-tokens",
                "1000",
                "--seed",
                "5",
                "--out-dir",
                "x/y",
                "--compile",
                "--train.grad_clip=0.5",
            ]
        )
    )
    assert (cfg.optim.lr, cfg.train.seq_len, cfg.train.micro_batch_size) == (0.005, 64, 2)
    assert cfg.train.grad_accum == 3  # resolved against the data-parallel size where the batch plan is made
    assert (cfg.train.max_steps, cfg.train.total_tokens, cfg.train.seed) == (7, 1000, 5)
    assert (cfg.train.out_dir, cfg.train.compile, cfg.train.grad_clip) == ("x/y", True, 0.5)


def test_grad_accum_shortcut_trains_with_that_accumulation(tmp_path):
    run_dir = tmp_path / "run"
    assert main([*cli_args(run_dir, 2), "--grad-accum", "2"]) == 0
    assert events(run_dir, "startup")[0]["training"]["grad_accum"] == 2


def test_overwrite_replaces_an_old_run(finished_run):
    old = events(finished_run, "summary")[-1]["time"]
    assert main([*cli_args(finished_run, 3), "--overwrite"]) == 0
    summaries = events(finished_run, "summary")
    assert len(summaries) == 1 and summaries[0]["time"] > old and summaries[0]["steps"] == 3


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing touched


def test_unknown_preset(tmp_path, capsys):
    assert main(["train", "--preset", "tiny,nosuchpreset", f"--train.out_dir={tmp_path / 'run'}"]) == 2
    one_error_line(capsys, "nosuchpreset")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("--train.lr=0.1", ("train.lr", "optim.lr")),  # unknown key: suggests the closest one
        ("--model.d_model=wide", ("model.d_model", "wide")),  # wrong type
        ("--train.precision=fp12", ("train.precision", "fp12")),  # not a choice
    ],
)
def test_config_errors(tmp_path, capsys, override, needles):
    assert main([*cli_args(tmp_path / "run", 2), override]) == 2
    one_error_line(capsys, *needles)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {seq_len: 32\n")
    assert main(["train", str(bad)]) == 2
    one_error_line(capsys, "bad.yaml")


def test_global_batch_that_does_not_divide(tmp_path, capsys):
    assert main([*cli_args(tmp_path / "run", 2), "--train.global_batch_tokens=200"]) == 2
    one_error_line(capsys, "train.global_batch_tokens=200", "128")  # names the key and micro x seq = 4 x 32
    assert not (tmp_path / "run").exists()  # refused before any file is written or a tokenizer trained


def test_out_dir_holding_another_runs_checkpoints_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(cli_args(finished_run, 2)) == 2
    one_error_line(capsys, "--resume", "--overwrite", str(finished_run))
    assert snapshot(finished_run) == before


def test_resume_and_overwrite_together_are_refused(finished_run, capsys):
    before = snapshot(finished_run)
    assert main([*cli_args(finished_run, 2), "--resume", "--overwrite"]) == 2
    one_error_line(capsys, "--resume", "--overwrite")
    assert snapshot(finished_run) == before


def test_resume_with_a_changed_model_shape_names_the_keys(finished_run, capsys):
    before = snapshot(finished_run)
    assert main([*cli_args(finished_run, 4, "model.d_model=128"), "--resume"]) == 2
    line = one_error_line(capsys, "model.d_model 64 -> 128")
    assert "tok_emb.weight" in line or "blocks.0" in line, line  # the tensors that no longer fit
    assert snapshot(finished_run) == before


def test_resume_from_a_missing_path(finished_run, capsys):
    assert main([*cli_args(finished_run, 2), "--resume", str(finished_run / "checkpoints" / "step_00000099")]) == 2
    one_error_line(capsys, "step_00000099")


def test_out_of_gpu_memory_names_the_knobs(tmp_path, capsys, monkeypatch):
    """An OOM in a step becomes one line naming micro-batch, activation checkpointing and sequence length."""
    from tokenmill.parallel.engine import Engine

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Engine, "forward_backward", oom)
    assert main(cli_args(tmp_path / "run", 2)) == 2
    one_error_line(
        capsys, "out of GPU memory", "train.micro_batch_size", "train.activation_checkpointing", "train.seq_len"
    )
    assert [e["status"] for e in events(tmp_path / "run", "summary")] == ["failed"]


# ---------------------------------------------------------------------------------------------------------
# the loop's and the config's bad inputs: one line, exit 2, no traceback, nothing touched


def assert_one_line(capsys, code: int, *needles: str, expected_code: int = 2) -> str:
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    assert "Traceback" not in captured.err + captured.out
    return one_error_line_from(captured.err, *needles)


def one_error_line_from(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


BEFORE_THE_RUN = {  # refused before any file is touched
    "device-not-a-device": (["--train.device=banana"], ("train.device='banana'", "cuda:N")),
    "step-cadence-inf": (["--train.step_cadence=.inf"], ("train.step_cadence=inf", "finite")),
    "step-cadence-nan": (["--train.step_cadence=nan"], ("train.step_cadence=nan",)),
    "empty-out-dir": (["--train.out_dir="], ("train.out_dir=''", "runs/my_run")),
    "moved-key": (["--train.eval_interval=5"], ("train.eval_interval moved to eval.interval_steps",)),
    "moved-key-stability": (["--train.nonfinite_policy=stop"], ("moved to stability.nonfinite_policy",)),
    "negative-eval-batches": (["--eval.max_batches=-2"], ("eval.max_batches=-2",)),
}
if not torch.cuda.is_available():
    BEFORE_THE_RUN["cuda-without-cuda"] = (["--train.device=cuda"], ("train.device='cuda'", "CUDA is not available"))
    BEFORE_THE_RUN["cuda-index-without-cuda"] = (["--train.device=cuda:1"], ("CUDA is not available",))


@pytest.mark.parametrize("extra, needles", list(BEFORE_THE_RUN.values()), ids=list(BEFORE_THE_RUN))
def test_bad_input_before_the_run(finished_run, tmp_path, capsys, extra, needles):
    before = snapshot(tmp_path)
    fresh = tmp_path / "fresh"
    assert_one_line(capsys, main([*cli_args(fresh, 2), *extra]), *needles)
    assert snapshot(tmp_path) == before and not fresh.exists()


@pytest.mark.parametrize("preset", [",", " , ", ",,"])
def test_preset_list_without_a_name(tmp_path, capsys, preset):
    out = tmp_path / "run"
    assert_one_line(
        capsys, main(["train", "--preset", preset, f"--train.out_dir={out}"]), "names no preset", "--preset"
    )
    assert not out.exists() and not (tmp_path / "runs").exists()  # the demo did not start either


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes. "
            "Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
    ids=["allocator", "memory-error"],
)
def test_cpu_out_of_memory_names_micro_batch_and_seq_len(tmp_path, capsys, monkeypatch, error):
    from tokenmill.parallel.engine import Engine

    def oom(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Engine, "forward_backward", oom)
    assert_one_line(
        capsys,
        main(cli_args(tmp_path / "run", 2)),
        "out of CPU memory",
        "micro_batch_size=4",
        "seq_len=32",
        "train.micro_batch_size",
        "train.seq_len",
    )
    assert [e["status"] for e in events(tmp_path / "run", "summary")] == ["failed"]


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    from tokenmill.parallel.engine import Engine

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Engine, "forward_backward", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(cli_args(tmp_path / "run", 2))


def test_real_cpu_out_of_memory_from_a_huge_seq_len(tmp_path):
    """seq_len = max_seq_len = 1e9 in a child whose address space is capped at 6 GiB (the allocation fails
    there instead of paging the shared machine): one line, exit 2."""
    import subprocess
    import sys

    from train_helpers import subprocess_env

    args = [*cli_args(tmp_path / "run", 1), "--train.seq_len=1e9", "--model.max_seq_len=1e9"]
    script = (
        "import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        f"from tokenmill.cli import main\nsys.exit(main({args!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    one_error_line_from(proc.stderr, "out of CPU memory", "seq_len=1000000000", "train.seq_len")


def test_metrics_folder_that_cannot_be_written(finished_run, tmp_path, capsys):
    """A file where the TensorBoard folder should be (as a read-only or broken out_dir would): one line naming
    the path, and the file is left as it was."""
    out = tmp_path / "new"
    out.mkdir()
    (out / "tb").write_text("not a folder\n")
    before = snapshot(tmp_path)
    assert_one_line(
        capsys,
        main([*cli_args(out, 2), "--log.tensorboard=true"]),
        "cannot write metrics to",
        str(out / "tb"),
        "train.out_dir",
    )
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed


def test_disk_full_while_logging_metrics(tmp_path, capsys, monkeypatch):
    """ENOSPC on the 6th metrics line (mid-run): one line saying the disk is full, like a checkpoint save's."""
    import errno

    from tokenmill.metrics import sinks as sinks_mod

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.lines = handle, 0

        def write(self, text):
            self.lines += 1
            if self.lines >= 6:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(sinks_mod, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)  # noqa: SIM115
    run_dir = tmp_path / "run"
    assert_one_line(
        capsys,
        main(cli_args(run_dir, 6)),
        "disk full while writing metrics to",
        str(run_dir / "metrics.jsonl"),
        "--resume",
    )

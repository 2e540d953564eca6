"""`tokenmill train` on the command line: shortcuts and the demo default map onto the config, and bad input
gets one error line, exit code 2, and leaves every existing file untouched (SPEC principles, issue 4)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from train_helpers import one_thread, cli_args, events  # noqa: F401 (one_thread: autouse fixture)

from tokenmill.cli import build_parser, main
from tokenmill.cli.train import config_from_train_args



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
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


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
    cfg = config_from_train_args(parse(["train", "--preset", "tiny", "--lr", "0.005", "--seq-len", "64",
                                        "--batch-size", "2", "--grad-accum", "3", "--max-steps", "7",
                                        "--total-tokens", "1000", "--seed", "5", "--out-dir", "x/y", "--compile",
                                        "--train.grad_clip=0.5"]))
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


@pytest.mark.parametrize("override, needles", [
    ("--train.lr=0.1", ("train.lr", "optim.lr")),  # unknown key: suggests the closest one
    ("--model.d_model=wide", ("model.d_model", "wide")),  # wrong type
    ("--train.precision=fp12", ("train.precision", "fp12")),  # not a choice
])
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
    one_error_line(capsys, "out of GPU memory", "train.micro_batch_size", "train.activation_checkpointing",
                   "train.seq_len")
    assert [e["status"] for e in events(tmp_path / "run", "summary")] == ["failed"]

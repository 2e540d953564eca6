"""`tokenmill rl` bad input: one error line, exit code 2, no traceback, and nothing written or changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rl_helpers import make_checkpoint, rl_args

from tokenmill.cli import main

MCQ_FILE = Path(__file__).parent / "data" / "mcq_tiny.jsonl"


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("source"))


def bad_task_file(tmp_path: Path) -> str:
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "q?", "options": ["a", "b"]}) + "\n")
    return str(path)


CASES = {
    "task file lacks a field": (
        lambda tmp: ["--rl.task=mcq", f"--rl.task_file={bad_task_file(tmp)}"],
        "questions.jsonl:1 lacks field(s) answer",
    ),
    "missing task file": (lambda tmp: ["--rl.task=mcq", f"--rl.task_file={tmp}/none.jsonl"], "does not exist"),
    "reward raises": (lambda tmp: ["--rl.rewards=[rl_rewards:raises]"], "raised KeyError"),
    "reward wrong length": (lambda tmp: ["--rl.rewards=[rl_rewards:wrong_length]"], "returned 1 values for 4"),
    "unknown reward": (lambda tmp: ["--rl.rewards=[nope]"], "names no reward"),
    "group of one": (lambda tmp: ["--rl.group_size=1"], "rl.group_size=1"),
    "unknown key": (lambda tmp: ["--rl.group=4"], "rl.group"),
    "prompts too long": (lambda tmp: [f"--rl.task_file={MCQ_FILE}"], "exceeds model.max_seq_len=32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(source, tmp_path, capsys, case):
    extra, message = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before, before_source = snapshot(out), snapshot(source)
    args = rl_args(source, out, *extra(tmp_path))
    if case.startswith(("task file", "missing task", "prompts too long")):
        args[args.index("--task") + 1] = "mcq"
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert snapshot(out) == before and snapshot(source) == before_source


def test_checkpoint_without_a_tokenizer_is_refused(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "bpe_run", "data.tokenizer=bpe")  # BPE, but no tokenizer.json anywhere
    before = snapshot(source)
    assert main(rl_args(source, tmp_path / "out")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer" in lines[0]
    assert snapshot(source) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rl", "--task", "copy"], "needs --from"),
        (["rl", "--from", "nowhere"], "needs --task"),
        (["rl", "--from", "no/such/run", "--task", "copy"], "no/such/run"),
        (["rl", "--from", "x", "--task", "copy", "--preset", "tiny"], "--preset does not apply"),
    ],
)
def test_missing_or_wrong_arguments_are_one_line(tmp_path, capsys, args, message):
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_mcq_task_runs_from_a_local_file(tmp_path):
    source = make_checkpoint(tmp_path / "long_context", "model.max_seq_len=96")  # room for the questions
    out = tmp_path / "mcq"
    args = rl_args(source, out, "--rl.steps=1", f"--rl.task_file={MCQ_FILE}", "--rl.eval_fraction=0.3", task="mcq")
    args = [a for a in args if not a.startswith("--rl.rewards")]  # the task's own reward: the answer letter
    assert main(args) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["kind"] == "train"]
    assert len(train) == 1 and "reward/mcq_letter" in train[0]
    assert [e for e in events if e["kind"] == "eval"][0]["prompts"] >= 1


def test_write_sft_set_writes_prompt_completion_pairs(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    assert main(["rl", "--task", "addition", "--write-sft-set", str(path), "--sft-examples", "50"]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"prompt", "completion"} for r in rows)
    assert main(["rl", "--task", "addition", "--write-sft-set", str(path)]) == 2  # never overwrites
    assert len(path.read_text().splitlines()) == 50


HELP_PROBE = """
import runpy, sys
sys.argv = ["tokenmill", "rl", "--help"]
try:
    runpy.run_module("tokenmill", run_name="__main__")
except SystemExit:
    pass
print("TORCH" if any(m == "torch" or m.startswith("torch.") for m in sys.modules) else "LIGHT")
"""


def test_rl_help_documents_the_rl_section_without_importing_torch():
    env = {**os.environ, "COLUMNS": "1000"}
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.rstrip().endswith("LIGHT"), proc.stderr[-2000:]
    assert "--rl.group_size" in proc.stdout and "--write-sft-set" in proc.stdout


def test_rl_fine_tunes_with_adamw_whatever_the_pretraining_optimizer(source, tmp_path):
    """The checkpoint's own config says Muon (the pretraining default); RL's small LRs are AdamW's."""
    import yaml

    from tokenmill.checkpoint.find import find_checkpoint

    assert yaml.safe_load((find_checkpoint(source) / "config.yaml").read_text())["optim"]["name"] == "muon"
    out = tmp_path / "rl"
    assert main(rl_args(source, out, "--rl.steps=1", "--rl.eval_interval_steps=0")) == 0
    assert yaml.safe_load((find_checkpoint(out) / "config.yaml").read_text())["optim"]["name"] == "adamw"
    assert main(rl_args(source, tmp_path / "rl2", "--rl.steps=1", "--optim.name=muon")) == 0  # an override wins
    assert yaml.safe_load((find_checkpoint(tmp_path / "rl2") / "config.yaml").read_text())["optim"]["name"] == "muon"

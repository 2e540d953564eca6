"""`tokenmill logs ...` on the command line: outputs, a corrupt line is a warning, bad input is one error line with
exit code 2 and no file changed, and the commands start without importing torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from run_fixtures import completed_events, write_run

from tokenmill.cli import main


def one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", completed_events())


def test_summary_text_json_and_markdown(run_dir, tmp_path, capsys):
    other = write_run(tmp_path / "other", completed_events([4.0] * 10))
    assert main(["logs", "summary", str(run_dir), str(other)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["run", "other"] and text[2].split() == ["status", "completed", "completed"]
    assert main(["logs", "summary", str(run_dir), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["final_loss"], record["min_loss_step"], record["eval_bpb"]) == (3.3, 8, 1.775)
    assert main(["logs", "summary", str(run_dir), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("|  | run |\n| --- | --- |\n| status | completed |")


def test_a_corrupt_line_is_skipped_with_one_warning(run_dir, capsys):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(5, '{"kind": "train", "step": 4, "lo')
    path.write_text("\n".join(lines) + "\n")
    assert main(["logs", "summary", str(run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"warning: {path}: skipped 1 unreadable line (line 6); read the rest"]
    assert json.loads(captured.out)[0]["final_loss"] == 3.3


def test_plot_writes_a_png(run_dir, tmp_path, capsys):
    out = tmp_path / "loss.png"
    assert main(["logs", "plot", str(run_dir), "--metrics", "loss,eval_loss", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 panels: loss, eval_loss; 1 run)"


def test_plot_terminal(run_dir, capsys):
    assert main(["logs", "plot", str(run_dir), "--metrics", "loss", "--terminal"]) == 0
    assert "Train loss (nats/token)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["summary", "{tmp}/nothing"], ["does not exist"]),
        (["summary", "{tmp}"], ["is not a run folder", "metrics.jsonl"]),
        (["summary", "{tmp}/empty"], ["is empty"]),
        (
            ["plot", "{run}", "--metrics", "loss,perplexity", "--out", "{tmp}/old.png"],
            ["unknown metric 'perplexity'", "eval_loss"],
        ),
        (["plot", "{run}", "--out", "{tmp}/plot.gif"], ["must end in .png or .svg"]),
        (["plot", "{run}", "--out", "{tmp}/no/such/dir.png"], ["does not exist"]),
        (["plot", "{run}", "--smooth", "0"], ["--smooth 0"]),
        (["compare", "{run}", "{tmp}/nothing"], ["does not exist"]),
        (["compare", "{run}", "{run}", "--tolerance", "-1"], ["--tolerance -1"]),
        (["compare", "{run}", "{run}", "--metric", "update_ratio"], ["one curve per block"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run_dir, tmp_path, capsys, argv, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "old.png").write_bytes(b"an earlier plot")
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    words = [w.format(tmp=tmp_path, run=run_dir) for w in argv]
    assert main(["logs", *words]) == 2
    one_error_line(capsys, *needles)
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "command, sentinel",
    [
        (["logs", "summary", "{run}"], "tokenmill.analysis.runs"),
        (["logs", "compare", "{run}", "{run}"], "tokenmill.analysis.compare"),
        (["logs", "plot", "{run}", "--terminal"], "tokenmill.analysis.plot"),
        (["ablate", "--help"], "tokenmill.cli.common"),
        (
            ["ablate", "--preset", "tiny", "--grid", "model.norm=rmsnorm,banana", "--out-dir", "{run}/x"],
            "tokenmill.analysis.ablate",
        ),
    ],
)
def test_commands_start_without_torch(run_dir, command, sentinel):
    """Reading logs, and planning an ablation up to its first child, need no torch (the children import it)."""
    argv = [w.format(run=run_dir) for w in command]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tokenmill", *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )
    assert done.returncode == (2 if "banana" in " ".join(command) else 0), done.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert sentinel in modules  # the check sees tokenmill's own imports
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
    assert "matplotlib" not in modules


def test_summary_of_a_real_tiny_run(tmp_path, capsys):
    """The loop's own metrics.jsonl (not a fixture): the fields the analysis reads are the ones it writes."""
    from train_helpers import cli_args, events

    run = tmp_path / "real"
    assert main(cli_args(run, 3)) == 0
    capsys.readouterr()
    assert main(["logs", "summary", str(run), "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    train = events(run, "train")
    assert (s["status"], s["steps"], s["total_steps"]) == ("completed", 3, 3)
    assert s["tokens"] == train[-1]["tokens_seen"] == 3 * 4 * 32 and s["params"] > 0
    assert (s["final_loss"], s["final_loss_step"]) == (train[-1]["loss"], 3)
    assert s["eval_loss"] == events(run, "eval")[-1]["loss"] and s["tokens_per_s"] > 0

"""`tokenmill ablate`: grids expand into named cells, bad input fails before any run starts (one line, exit 2,
nothing written), and a 2x2 grid of tiny runs reports 4 cells that a rerun skips."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path

import pytest

from tokenmill.analysis.ablate import (
    Base,
    ablate,
    cell_names,
    collect,
    mean_std,
    parse_grid,
    parse_seeds,
    plan,
    results_markdown,
    split_values,
)
from tokenmill.cli import main
from tokenmill.errors import UserError
from train_helpers import TINY_OVERRIDES

TINY = ["--preset", "tiny", *("--" + o for o in TINY_OVERRIDES)]


def one_error_line(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(root) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_values_split_on_top_level_commas_only():
    assert split_values("layernorm,rmsnorm") == ["layernorm", "rmsnorm"]
    assert split_values("[0.9,0.95],[0.9,0.99]") == ["[0.9,0.95]", "[0.9,0.99]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_cells_and_names():
    grid = parse_grid(["model.norm=layernorm,rmsnorm", "optim.lr=1e-3,3e-3"])
    assert grid == {"model.norm": ["layernorm", "rmsnorm"], "optim.lr": ["1e-3", "3e-3"]}
    assert [name for name, _ in cell_names(grid)] == [
        "norm=layernorm__lr=1e-3",
        "norm=layernorm__lr=3e-3",
        "norm=rmsnorm__lr=1e-3",
        "norm=rmsnorm__lr=3e-3",
    ]
    assert cell_names({"a.lr": ["1"], "b.lr": ["[2, 3]"]}) == [("a.lr=1__b.lr=_2_3_", {"a.lr": "1", "b.lr": "[2, 3]"})]
    assert cell_names({}) == [("base", {})]


@pytest.mark.parametrize(
    "items, needle",
    [
        (["model.norm"], "write it as key=value1,value2"),
        (["model.norm="], "write it as key=value1,value2"),
        (["model.norm=a,,b"], "write it as key=value1,value2"),
        (["optim.lr=1,2", "optim.lr=3"], "names optim.lr twice"),
        (["optim.lr=1,1"], "repeats a value"),
    ],
)
def test_bad_grids(items, needle):
    with pytest.raises(UserError, match=needle):
        parse_grid(items)


def test_seeds():
    assert parse_seeds("1,2,2") == [1, 2] and parse_seeds(None) is None
    with pytest.raises(UserError, match="seeds are integers"):
        parse_seeds("1,x")


def test_plan_resolves_every_cell_and_seed(tmp_path):
    jobs = plan(
        Base(("tiny",), None, ("data.tokenizer=byte",)),
        parse_grid(["model.norm=layernorm,rmsnorm"]),
        [3, 4],
        5,
        tmp_path,
    )
    assert [(j.cell, j.seed, j.folder.relative_to(tmp_path).as_posix()) for j in jobs] == [
        ("norm=layernorm", 3, "norm=layernorm/seed3"),
        ("norm=layernorm", 4, "norm=layernorm/seed4"),
        ("norm=rmsnorm", 3, "norm=rmsnorm/seed3"),
        ("norm=rmsnorm", 4, "norm=rmsnorm/seed4"),
    ]
    assert [(j.config["model"]["norm"], j.config["train"]["seed"], j.config["train"]["max_steps"]) for j in jobs] == [
        ("layernorm", 3, 5),
        ("layernorm", 4, 5),
        ("rmsnorm", 3, 5),
        ("rmsnorm", 4, 5),
    ]
    assert not any(j.uses_bpe for j in jobs) and not list(tmp_path.iterdir())  # planning writes nothing


def test_results_table_is_mean_and_std_over_completed_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([2.5]) == {"mean": 2.5, "std": None, "n": 1}
    cells = [
        {
            "cell": "norm=a",
            "settings": {"model.norm": "a"},
            "runs": [{}, {}],
            "status": "2 completed",
            "eval_loss": mean_std([3.0, 3.2]),
            "eval_bpb": mean_std([1.0, 1.2]),
            "tokens_per_s": mean_std([1000.0, 1200.0]),
            "params": mean_std([5e6, 5e6]),
        },
        {
            "cell": "norm=b",
            "settings": {"model.norm": "b"},
            "runs": [{}],
            "status": "1 failed",
            "eval_loss": mean_std([]),
            "eval_bpb": mean_std([]),
            "tokens_per_s": mean_std([]),
            "params": mean_std([]),
        },
    ]
    lines = results_markdown(cells, ["model.norm"]).splitlines()
    assert lines[0] == "| cell | model.norm | seeds | eval loss | eval bpb | tokens/s | params | runs |"
    assert lines[2] == ("| norm=a | a | 2 | **3.1000 ± 0.1414** | 1.1000 ± 0.1414 | 1.1k ± 141 | 5M | 2 completed |")
    assert lines[3] == "| norm=b | b | 1 | - | - | - | - | 1 failed |"


def test_collect_counts_statuses_and_leaves_failed_runs_out(tmp_path):
    jobs = plan(Base(("tiny",), None, ("data.tokenizer=byte",)), {}, [1, 2], 1, tmp_path)
    jobs[0].status, jobs[1].status = "completed", "failed"
    (cell,) = collect(jobs)
    assert cell["status"] == "1 completed, 1 failed" and cell["eval_loss"] == {"mean": None, "std": None, "n": 0}
    assert [run["seed"] for run in cell["runs"]] == [1, 2]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--grid", "model.nrom=a,b"], ["model.nrom"]),
        (["--grid", "model.norm=banana,rmsnorm"], ["model.norm", "banana"]),
        (["--grid", "model.norm"], ["--grid 'model.norm'"]),
        (["--seeds", "one"], ["--seeds 'one'"]),
        (["--parallel", "0"], ["--parallel 0"]),
        (["--max-steps", "0"], ["--max-steps 0"]),
    ],
)
def test_bad_input_fails_before_any_run(tmp_path, capsys, extra, needles):
    out = tmp_path / "abl"
    assert main(["ablate", *TINY, "--out-dir", str(out), *extra]) == 2
    one_error_line(capsys, *needles)
    assert not out.exists()


def test_no_base_config_is_an_error(tmp_path, capsys):
    assert main(["ablate", "--grid", "model.norm=layernorm,rmsnorm", "--out-dir", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "BASE.yaml or --preset")


def test_folders_of_other_runs_are_refused_untouched(tmp_path, capsys):
    out = tmp_path / "abl"
    foreign = out / "norm=rmsnorm" / "seed1"
    foreign.mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text('{"kind": "config", "step": 0, "time": 1}\n')
    argv = ["ablate", *TINY, "--grid", "model.norm=layernorm,rmsnorm", "--seeds", "1", "--out-dir", str(out)]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    one_error_line(capsys, str(foreign), "no cell.json")
    (foreign / "metrics.jsonl").unlink()
    (foreign / "cell.json").write_text(json.dumps({"config": {"model": {"norm": "rmsnorm"}, "optim": {"lr": 9}}}))
    before = snapshot(tmp_path)
    assert main(argv) == 2
    one_error_line(capsys, str(foreign), "other settings")
    assert snapshot(tmp_path) == before and not (out / "norm=layernorm").exists()


class FakeTrain:
    """Stands in for the `python -m tokenmill train` child: writes what a run writes, or fails for one cell."""

    def __init__(self, failing_cell: str) -> None:
        self.failing_cell, self.lock, self.running, self.calls = failing_cell, threading.Lock(), 0, []
        self.real_run = subprocess.run

    def __call__(self, argv, stdout=None, **kwargs):
        if argv[1:4] != ["-m", "tokenmill", "train"]:  # anything else (matplotlib's font lookup) really runs
            return self.real_run(argv, stdout=stdout, **kwargs)
        folder = Path(next(a for a in argv if a.startswith("--train.out_dir=")).split("=", 1)[1])
        with self.lock:
            self.running += 1
            self.calls.append(
                {
                    "folder": folder,
                    "concurrent": self.running,
                    "had_tokenizer": (folder / "tokenizer" / "tokenizer-bpe-k" / "tokenizer.json").is_file(),
                    "resume": argv[-1] == "--resume",
                }
            )
        if self.failing_cell in str(folder):
            stdout.write("error: something went wrong\n")
            code = 2
        else:
            (folder / "tokenizer" / "tokenizer-bpe-k").mkdir(parents=True, exist_ok=True)
            (folder / "tokenizer" / "tokenizer-bpe-k" / "tokenizer.json").write_text("{}")
            events = [
                {"kind": "config", "step": 0, "time": 1.0},
                {"kind": "eval", "step": 2, "time": 2.0, "loss": 3.0 + len(self.calls) / 10, "bpb": 1.5},
                {"kind": "summary", "step": 2, "time": 3.0, "status": "completed"},
            ]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
            code = 0
        with self.lock:
            self.running -= 1
        return subprocess.CompletedProcess(argv, code)


def test_runner_shares_the_first_tokenizer_and_reports_a_failed_run(tmp_path, monkeypatch):
    fake = FakeTrain(failing_cell="lr=0.3")
    monkeypatch.setattr(subprocess, "run", fake)
    lines = []
    result = ablate(
        Base(("tiny",)), parse_grid(["optim.lr=0.1,0.2,0.3"]), [1, 2], 2, tmp_path, parallel=2, echo=lines.append
    )
    assert len(fake.calls) == 6 and all(call["resume"] for call in fake.calls)
    first, *rest = fake.calls
    assert first["concurrent"] == 1 and not first["had_tokenizer"]  # alone: it trains the BPE the others reuse
    assert all(call["had_tokenizer"] for call in rest)
    assert [job.status for job in result.jobs] == ["completed"] * 4 + ["failed"] * 2
    failed = result.failed[0]
    assert failed.message.startswith("exit code 2: error: something went wrong (see ")
    assert [cell["status"] for cell in result.cells] == ["2 completed", "2 completed", "2 failed"]
    assert lines[0].startswith("ablation: 3 cells x 2 seeds")
    assert [line.split()[0] for line in lines[1:]] == [f"[{i}/6]" for i in range(1, 7)]  # in finishing order
    assert sum("lr=0.3 seed" in line and ": failed in" in line for line in lines) == 2
    assert [p.name for p in result.files] == ["ablation.json", "ablation.md", "ablation.png"]

    fake.calls.clear()
    ablate(Base(("tiny",)), parse_grid(["optim.lr=0.1,0.2,0.3"]), [1, 2], 2, tmp_path, parallel=2, echo=lines.append)
    assert sorted(call["folder"].parent.name for call in fake.calls) == ["lr=0.3", "lr=0.3"]  # only the failed


@pytest.mark.slow
def test_2x2_grid_of_tiny_runs_reports_4_cells_and_a_rerun_skips_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "abl"
    argv = [
        "ablate",
        *TINY,
        "--grid",
        "model.norm=layernorm,rmsnorm",
        "--grid",
        "optim.lr=1e-3,3e-3",
        "--max-steps",
        "5",
        "--out-dir",
        str(out),
        "--parallel",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "ablation.json").read_text())
    cells = results["cells"]
    assert [c["cell"] for c in cells] == [
        "norm=layernorm__lr=1e-3",
        "norm=layernorm__lr=3e-3",
        "norm=rmsnorm__lr=1e-3",
        "norm=rmsnorm__lr=3e-3",
    ]
    for cell in cells:
        assert cell["status"] == "1 completed" and cell["eval_loss"]["n"] == 1 and cell["eval_loss"]["std"] is None
        assert 0 < cell["eval_loss"]["mean"] < 10 and cell["params"]["mean"] > 0
        (run,) = cell["runs"]
        assert (
            json.loads((out / cell["cell"] / f"seed{run['seed']}" / "cell.json").read_text())["settings"]
            == cell["settings"]
        )
    assert len({c["eval_loss"]["mean"] for c in cells}) == 4  # the settings reached the runs
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table == [line for line in printed.splitlines() if line.startswith("|")]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    assert len(metrics) == 4
    assert main(argv) == 0
    assert "skipping 4 finished runs of 4" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == metrics

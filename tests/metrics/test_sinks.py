"""Metric sinks: JSONL (append, resume, strict JSON), TensorBoard (readable events), W&B (lazy, run id reuse),
console lines, and no-op sinks off rank 0."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import pytest
import torch
from rich.console import Console

from tokenmill.errors import UserError
from tokenmill.metrics import sinks as sinks_mod
from tokenmill.metrics.config import LogConfig
from tokenmill.metrics.sinks import (
    ConsoleSink,
    JsonlSink,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    build_sinks,
    read_jsonl,
)


def test_jsonl_one_object_per_event_appends_and_is_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(0, {"model": {"d_model": 8}}, "config")
    sink.log(1, {"loss": torch.tensor(2.5), "ppl": math.inf, "grad": float("nan"), "p": tmp_path}, "train")
    sink.close()
    again = JsonlSink(path)  # a second process on the same run appends
    again.log(2, {"loss": 2.0}, "train")
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    events = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) for line in lines]
    assert [e["kind"] for e in events] == ["config", "train", "train"]
    assert events[1]["loss"] == 2.5 and events[1]["ppl"] is None and events[1]["grad"] is None
    assert events[1]["p"] == str(tmp_path) and isinstance(events[1]["time"], float)


def test_jsonl_resume_drops_events_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(0, {"model": {}}, "config")
    for step in range(1, 7):
        sink.log(step, {"loss": 1.0 / step}, "train")
    sink.log(4, {"path": "ckpt"}, "checkpoint")
    sink.close()
    with open(path, "a") as handle:
        handle.write('{"kind": "train", "st')  # torn line from a kill
    resumed = JsonlSink(path, resume_step=4)
    resumed.log(4, {"path": "ckpt"}, "resume")
    resumed.log(5, {"loss": 0.2}, "train")
    resumed.close()
    events = read_jsonl(path)
    assert [(e["kind"], e["step"]) for e in events] == [("config", 0)] + [("train", s) for s in range(1, 5)] + [
        ("checkpoint", 4),
        ("resume", 4),
        ("train", 5),
    ]


def test_tensorboard_events_are_written_and_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2, 3):
        sink.log(step, {"loss": 4.0 - step, "lr": 1e-3, "mfu": None, "note": "x"}, "train")
    sink.log(3, {"loss": 2.5}, "eval")
    sink.log(3, {"samples": {"def ": "def f(): pass"}}, "sample")
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss"} <= set(scalars) and "train/mfu" not in scalars
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert acc.Scalars("eval/loss")[0].value == 2.5
    assert any(tag.startswith("sample/") for tag in acc.Tags()["tensors"])


def test_build_sinks_rank0_and_noop_elsewhere(tmp_path):
    cfg = LogConfig(tensorboard=True)
    rank1 = build_sinks(cfg, tmp_path / "r1", rank=1)
    assert isinstance(rank1, MultiSink) and rank1.sinks == []
    rank1.log(1, {"loss": 1.0})
    rank1.close()
    assert not (tmp_path / "r1").exists()
    rank0 = build_sinks(cfg, tmp_path / "r0", rank=0, console=False)
    rank0.log(1, {"loss": 1.0})
    rank0.close()
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl")[0]["loss"] == 1.0
    assert list((tmp_path / "r0" / "tb").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="unknown metrics kind"):
        rank0.log(1, {}, kind="trian")


def test_wandb_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"log.wandb=offline needs the wandb package: pip install"):
        build_sinks(LogConfig(wandb="offline"), tmp_path, console=False)


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.config = types.SimpleNamespace(update=lambda data, allow_val_change: self.logged.append(("cfg", data)))
        self.summary = {}

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_sink_reuses_run_id_on_resume(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first = WandbSink(tmp_path, "proj", "offline", config={"a": 1})
    first.log(5, {"loss": 1.5, "mfu": None}, "train")
    first.log(5, {"loss": 1.4}, "eval")
    first.close()
    assert runs[0].kwargs["mode"] == "offline" and runs[0].kwargs["resume"] == "allow"
    assert runs[0].logged[:2] == [(5, {"train/loss": 1.5}), (5, {"eval/loss": 1.4})] and runs[0].finished
    resumed = WandbSink(tmp_path, "proj", "offline", resume=True)
    fresh = WandbSink(tmp_path, "proj", "offline", resume=False)
    assert resumed.run_id == first.run_id
    assert fresh.run_id != first.run_id
    assert (tmp_path / sinks_mod.WANDB_ID_FILE).read_text().strip() == fresh.run_id


def test_console_lines_are_compact_and_escape_markup():
    out = io.StringIO()
    sink = ConsoleSink(Console(file=out, width=200))
    sink.log(
        120,
        {
            "loss": 3.21,
            "lr": 3e-4,
            "tokens_per_s": 12345.0,
            "mfu": None,
            "step_time_s": 0.085,
            "eta_s": 3720.0,
            "total_steps": 1000,
        },
        "train",
    )
    sink.log(120, {"samples": {"[bold]x": "y"}}, "sample")
    sink.log(120, {"model": {}}, "config")
    text = out.getvalue()
    first = text.splitlines()[0]
    assert first == "step 120/1000 | loss 3.2100 | lr 3.00e-04 | 12.3k tok/s | 85 ms/step | eta 1h02m"
    assert "[bold]x" in text  # shown literally, not as markup
    assert "model" not in text


def test_warning_events_print_one_console_line_and_reach_the_jsonl(tmp_path):
    out = io.StringIO()
    sinks = MultiSink([ConsoleSink(Console(file=out, width=200)), JsonlSink(tmp_path / "metrics.jsonl")])
    sinks.log(3, {"message": "evaluation is skipped: [no eval split]"}, "warning")
    sinks.close()
    assert out.getvalue() == "warning step 3 | evaluation is skipped: [no eval split]\n"  # markup shown literally
    assert read_jsonl(tmp_path / "metrics.jsonl", "warning")[0]["message"].endswith("[no eval split]")


@pytest.mark.parametrize(
    "code, needle",
    [
        (28, "disk full while writing metrics to"),  # ENOSPC
        (30, "cannot write metrics to"),  # EROFS
        (13, "cannot write metrics to"),
    ],
)  # EACCES
def test_write_errors_become_one_line_and_the_failing_sink_is_dropped(tmp_path, code, needle):
    import errno

    assert code in (errno.ENOSPC, errno.EROFS, errno.EACCES)

    class Failing:
        closed = 0

        def log(self, step, metrics, kind="train"):
            with sinks_mod.writing(tmp_path / "metrics.jsonl"):
                raise OSError(code, "simulated")

        def close(self):
            Failing.closed += 1

    seen = []

    class Recording:
        def log(self, step, metrics, kind="train"):
            seen.append((step, kind))

        def close(self):
            seen.append("closed")

    sinks = MultiSink([Failing(), Recording()])
    with pytest.raises(UserError) as err:
        sinks.log(1, {"loss": 1.0})
    assert needle in str(err.value) and str(tmp_path / "metrics.jsonl") in str(err.value)
    assert "\n" not in str(err.value) and Failing.closed == 1
    sinks.log(2, {"status": "failed"}, "summary")  # the run's closing summary still reaches the others
    sinks.close()
    assert seen == [(2, "summary"), "closed"]

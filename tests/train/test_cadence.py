"""One cadence rule for log / eval / checkpoint: intervals in steps or tokens, scaled by train.step_cadence, and
the loop and the StepMonitor follow the same steps."""

from __future__ import annotations

import pytest

from tokenmill.config import load_config
from tokenmill.train.batching import plan_batches
from tokenmill.train.cadence import Cadence, build_cadence, interval_in_steps
from tokenmill.train.loop import train
from train_helpers import events, one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)

TOKENS_PER_STEP = 4 * 32  # the tiny run: micro-batch 4 x seq_len 32


@pytest.mark.parametrize(
    "steps, tokens, scale, expected",
    [
        (10, 0, 1.0, 10),  # steps
        (10, 0, 0.5, 5),  # scaled
        (10, 0, 0.01, 1),  # never rounds a periodic event away
        (0, 0, 3.0, 0),  # 0 = never, whatever the scale
        (10, 1000, 1.0, 8),  # tokens win: 1000 / 128 = 7.8 -> 8 steps
        (0, 256, 1.0, 2),  # tokens with no step interval
        (0, 256, 2.5, 5),  # tokens scaled too
        (0, 1, 1.0, 1),  # less than a step: every step
    ],
)
def test_interval_in_steps(steps, tokens, scale, expected):
    assert interval_in_steps(steps, tokens, TOKENS_PER_STEP, scale) == expected


def test_cadence_rules():
    cadence = Cadence(log_every=3, eval_every=4, checkpoint_every=0, per_layer_every=2, total_steps=10)
    assert [s for s in range(1, 11) if cadence.is_log_step(s)] == [3, 6, 9, 10]  # the last step is always logged
    assert [s for s in range(1, 11) if cadence.is_eval_step(s)] == [4, 8]  # the final eval belongs to the tear-down
    assert not any(cadence.is_checkpoint_step(s) for s in range(1, 11))
    assert [s for s in range(1, 11) if cadence.is_per_layer_step(s)] == [6]  # every 2nd periodic log step


def test_build_cadence_reads_every_section():
    cfg = load_config(
        ["tiny"],
        overrides=[
            "log.interval_tokens=512",
            "eval.interval_steps=6",
            "eval.interval_tokens=0",
            "checkpoint.interval_tokens=1024",
            "train.step_cadence=0.5",
        ],
    )
    plan = plan_batches(4, 32, 1, 0, 0, 100, 1000)
    cadence = build_cadence(cfg, plan, n_params=1000)
    assert (cadence.log_every, cadence.eval_every, cadence.checkpoint_every) == (2, 3, 4)
    assert cadence.total_steps == 100


def test_the_loop_logs_evaluates_and_saves_on_token_intervals(tmp_path):
    """log every 2 steps and eval / save every 3 steps given in tokens, halved by step_cadence=0.5 from 4 / 6."""
    result = train(
        tiny_config(
            tmp_path / "run",
            7,
            f"log.interval_tokens={4 * TOKENS_PER_STEP}",
            f"eval.interval_tokens={6 * TOKENS_PER_STEP}",
            f"checkpoint.interval_tokens={6 * TOKENS_PER_STEP}",
            "train.step_cadence=0.5",
            "log.per_layer_interval=2",
            "eval.max_batches=1",
        )
    )
    assert result.status == "completed"
    run_dir = result.run_dir
    train_events = events(run_dir, "train")
    assert [e["step"] for e in train_events] == [2, 4, 6, 7]
    # the monitor followed the same cadence: gradient statistics on every logged step, per-layer on every 2nd
    assert all(e["grad_mean"] is not None for e in train_events)
    assert [e["step"] for e in train_events if "grad_norm/blocks.0" in e] == [4]
    assert [e["step"] for e in events(run_dir, "eval")] == [3, 6, 7]
    assert [(e["step"], e["reason"]) for e in events(run_dir, "checkpoint")] == [
        (3, "interval"),
        (6, "interval"),
        (7, "final"),
    ]
    startup = events(run_dir, "startup")[0]["training"]
    assert (startup["log_every_steps"], startup["eval_every_steps"], startup["checkpoint_every_steps"]) == (2, 3, 3)

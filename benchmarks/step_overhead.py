"""Training-step overhead of tokenmill over a bare PyTorch loop, and demo tokens/s (goal: CPU overhead <= 5%).
Prints a table; not a test.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--threads 1] [--steps 5] [--rounds 5] [--no-compile]

Both sides train the demo model (preset `demo`: 4 layers, d=256, seq 256, micro-batch 16, vocab 4096) built
by `tokenmill.model.build_model`, on one fixed random batch, with AdamW (fused), clipping at 1.0 and the
same precision:
- bare: `model.loss(window)` (forward + fp32 cross-entropy, the model's own loss, so both sides run the
  same kernels), backward, clip_grad_norm_, step, zero_grad, loss.item();
- tokenmill: the real `train()` loop (engine micro-step, non-finite check, clip, scheduler, divergence
  detector, monitor, console/JSONL sinks, progress bar, cadence checks), with its data loader replaced
  by the same fixed batch (data throughput is benchmarks/data_throughput.py's job).
Step time = time between the starts of consecutive steps (the loop's whole cost, log steps included),
`--steps` steps after 2 warm-up steps, in `--rounds` alternating bare/tokenmill rounds, on two clocks:
the process's CPU time (with one thread: the step's cost, free of the waits other jobs on a shared
machine cause) and the wall clock. Overhead = the median over rounds of (tokenmill round median / bare
round median - 1); the two rounds of a pair ran back to back. Tokens/s and compile time are wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

WARMUP = 2
DEMO = [
    "data.tokenizer=byte",
    "model.vocab_size=4096",
    "eval.sample_prompts=[]",
    "eval.max_batches=1",
    "eval.interval_steps=0",
    "checkpoint.interval_steps=0",
    "train.device=cpu",
    "model.dropout=0.0",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def demo_config(precision: str, compile_: bool, out_dir: str, steps: int, extra: list[str]):
    from tokenmill.config import load_config

    return load_config(
        ["demo"],
        None,
        [
            *DEMO,
            f"train.precision={precision}",
            f"train.compile={compile_}",
            f"train.max_steps={steps}",
            f"train.out_dir={out_dir}",
            *extra,
        ],
    )


def fixed_batch(cfg) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=g)
    return {"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}


class FixedBatches:
    """Stands in for the data loader: the same batch forever, nothing to save."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time). With one torch thread the CPU time of a step is its cost
    without the waits other jobs on a shared machine cause (and it still counts tokenmill's helper threads)."""
    return time.perf_counter(), time.process_time()


def step_times(starts: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall and CPU seconds of each step from step start times, skipping the warm-up steps."""
    return {
        clock: [b[i] - a[i] for a, b in itertools.pairwise(starts)][WARMUP:] for i, clock in enumerate(("wall", "cpu"))
    }


def bare_round(cfg, batch: dict[str, torch.Tensor], steps: int) -> dict[str, list[float]]:
    """A plain PyTorch loop on the same model, batch, precision and optimizer."""
    from tokenmill.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=True
    )
    window = batch["tokens"]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.precision == "bf16" else contextlib.nullcontext()
    )
    starts = []
    for _ in range(steps + WARMUP + 1):
        starts.append(now())
        with autocast:
            loss = model.loss(window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return step_times(starts)


def tokenmill_round(
    precision: str, compile_: bool, steps: int, extra: list[str]
) -> tuple[dict[str, list[float]], float]:
    """tokenmill's train() on the fixed batch; returns (step times, wall seconds of set-up + compile)."""
    import tokenmill.train.loop as train_module
    from tokenmill.parallel.engine import Engine

    starts: list[tuple[float, float]] = []
    real_fb = Engine.forward_backward

    def forward_backward(engine, *args, **kwargs):
        starts.append(now())
        return real_fb(engine, *args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(precision, compile_, f"{tmp}/run", steps + WARMUP + 1, extra)
        batch = fixed_batch(cfg)
        real_build = train_module.build_loader
        Engine.forward_backward = forward_backward
        train_module.build_loader = lambda *args, **kwargs: FixedBatches(batch)
        began = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result = train_module.train(cfg)
        finally:
            Engine.forward_backward, train_module.build_loader = real_fb, real_build
        if result.status != "completed":
            raise RuntimeError(f"benchmark run ended {result.status}")
    return step_times(starts), starts[WARMUP][0] - began


def paired_overhead(rounds: list[tuple[dict, dict]], clock: str) -> tuple[float, list[float]]:
    """Median over rounds of tokenmill/bare - 1 (each pair ran back to back), and every round's value."""
    each = [statistics.median(m[clock]) / statistics.median(b[clock]) - 1 for b, m in rounds]
    return statistics.median(each), each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare/tokenmill rounds per setting")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--precision", action="append", default=None, help="fp32 and/or bf16 (default both)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra config override, e.g. model.n_layers=2 (applies to both sides)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # a cold Inductor cache, so "set-up+compile" is what a first run pays (removed at exit)
    cache = tempfile.TemporaryDirectory(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    precisions = args.precision or ["fp32", "bf16"]
    load_before = os.getloadavg()
    print(
        f"step_overhead: {time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s), load average {load_before[0]:.1f}"
    )
    probe = demo_config("fp32", False, "unused", 1, args.override)
    tokens = probe.train.micro_batch_size * probe.train.seq_len
    print(
        f"model: {probe.model.n_layers} layers, d={probe.model.d_model}, vocab {probe.model.vocab_size}; "
        f"batch {probe.train.micro_batch_size} x {probe.train.seq_len} = {tokens} tokens/step; "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )

    header = (
        "mode",
        "precision",
        "bare ms/step (CPU)",
        "tokenmill ms/step (CPU)",
        "overhead (CPU)",
        "overhead (wall)",
        "tokenmill tokens/s (wall)",
        "set-up+compile (wall)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for precision in precisions:
        cfg = demo_config(precision, False, "unused", 1, args.override)
        batch = fixed_batch(cfg)
        rounds = [
            (bare_round(cfg, batch, args.steps), tokenmill_round(precision, False, args.steps, args.override)[0])
            for _ in range(args.rounds)
        ]
        bare_cpu = statistics.median([t for b, _ in rounds for t in b["cpu"]])
        mill_cpu = statistics.median([t for _, m in rounds for t in m["cpu"]])
        mill_wall = statistics.median([t for _, m in rounds for t in m["wall"]])
        cpu, cpu_each = paired_overhead(rounds, "cpu")
        wall, wall_each = paired_overhead(rounds, "wall")
        lines.append(
            f"| eager | {precision} | {1000 * bare_cpu:.1f} | {1000 * mill_cpu:.1f} | {100 * cpu:+.1f}% | "
            f"{100 * wall:+.1f}% | {tokens / mill_wall:,.0f} | - |"
        )
        notes.append(
            f"{precision} rounds, CPU: {' '.join(f'{100 * r:+.1f}%' for r in cpu_each)}; "
            f"wall: {' '.join(f'{100 * r:+.1f}%' for r in wall_each)}"
        )
    if not args.no_compile:
        for precision in precisions:
            times, setup = tokenmill_round(precision, True, args.steps, args.override)
            lines.append(
                f"| compiled | {precision} | - | {1000 * statistics.median(times['cpu']):.1f} | - | - | "
                f"{tokens / statistics.median(times['wall']):,.0f} | {setup:.0f} s |"
            )
    print("\n".join(lines))
    print("\n" + "\n".join(notes))
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

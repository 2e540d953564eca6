"""CPU training throughput of tokenmill against a bare PyTorch loop and a nanoGPT-equivalent run at equal shape
(goal: tokenmill >= nanoGPT's tokens/s in fp32, bf16 and bf16 + torch.compile). Prints a table; not a test.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--steps 4] [--rounds 5] [--settings fp32,bf16,compile]

Every side trains the same GPT-2-shaped model: preset `demo` with the `gpt2` bundle (4 layers, d=256, 4 heads,
LayerNorm, learned positions, 4x GELU MLP, biases, tied head; vocab 4096; micro-batch 16 x seq 256 = 4096
tokens per step), AdamW (fused), clipping at 1.0, no dropout, the same precision:
- nanogpt: benchmarks/nanogpt_reference.py (nanoGPT's model and step; `torch.compile(model)` when compiled),
  equal parameter count checked;
- bare: tokenmill's model from `build_model`, `model.loss(window)`, backward, clip, step, zero_grad;
- tokenmill: the real `train()` loop (engine micro-step, non-finite check, clip, scheduler, divergence
  detector, monitor, console/JSONL sinks, progress bar, job control) on one fixed batch;
- tokenmill+data: the same with its real data loader: `stdlib` text tokenized on the fly by a 4096-token BPE
  trained once for the benchmark, packed and shuffled as in the demo;
- compiled, tokenmill runs once per `train.compile_scope` (model: one graph; blocks: one per block).
Step time = time between the starts of consecutive steps (the loop's whole cost, data and log steps
included), `--steps` steps after 2 warm-up steps (compile happens there, in the first round; later rounds
reuse the compiled graphs). Each round runs every variant of a
setting once, back to back, in an order rotated per round; a variant's ratio to nanoGPT is taken per round
(nanoGPT median step time / variant median step time = relative tokens/s), and the table shows the median
over rounds and the range (the noise band). Main clock: this process's CPU time (with one torch thread, a
step's cost without the waits other jobs on a shared machine cause; helper threads count, worker processes
would not); wall-clock tokens/s is shown too. Run nothing else heavy meanwhile.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import nanogpt_reference as nano
import torch

WARMUP = 2
SHAPE = [
    "model.vocab_size=4096",
    "model.n_kv_heads=0",
    "model.dropout=0.0",
    "eval.sample_prompts=[]",
    "eval.max_batches=1",
    "eval.interval_steps=0",
    "checkpoint.interval_steps=0",
    "train.device=cpu",
]
SETTINGS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "compile": ("bf16", True)}
Times = dict[str, list[float]]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_config(precision: str, overrides: list[str]):
    from tokenmill.config import load_config

    return load_config(["demo", "gpt2"], None, [*SHAPE, f"train.precision={precision}", *overrides])


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

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"batches": 0, "sources": {}}


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time, all its threads)."""
    return time.perf_counter(), time.process_time()


def step_times(starts: list[tuple[float, float]]) -> Times:
    """Wall and CPU seconds of each step from step start times, skipping the warm-up steps."""
    return {
        clock: [b[i] - a[i] for a, b in itertools.pairwise(starts)][WARMUP:] for i, clock in enumerate(("wall", "cpu"))
    }


def shape_of(cfg) -> nano.GPTShape:
    m = cfg.model
    return nano.GPTShape(m.n_layers, m.d_model, m.n_heads, m.vocab_size, m.max_seq_len)


def nanogpt_round(cfg, batch: dict[str, torch.Tensor], steps: int, compiled: bool) -> Times:
    """nanoGPT's model and step (benchmarks/nanogpt_reference.py); `torch.compile(model)` as its train.py does."""
    torch.manual_seed(cfg.train.seed)
    model = nano.GPT(shape_of(cfg))
    o = cfg.optim
    opt = nano.build_optimizer(model, o.lr, tuple(o.betas), o.weight_decay)
    run = torch.compile(model) if compiled else model
    ctx = nano.autocast_context(cfg.train.precision)
    starts = []
    for _ in range(steps + WARMUP + 1):
        starts.append(now())
        nano.train_step(run, opt, ctx, batch["tokens"], cfg.train.grad_clip).item()
    return step_times(starts)


def bare_round(cfg, batch: dict[str, torch.Tensor], steps: int) -> Times:
    """A plain PyTorch loop on tokenmill's model, same batch, precision and optimizer."""
    from tokenmill.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=True
    )
    ctx = nano.autocast_context(cfg.train.precision)
    starts = []
    for _ in range(steps + WARMUP + 1):
        starts.append(now())
        with ctx:
            loss = model.loss(batch["tokens"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return step_times(starts)


def tokenmill_round(cfg_overrides: list[str], precision: str, steps: int, batch: dict | None) -> Times:
    """tokenmill's train(); on `batch` forever when given, else on its own data loader."""
    import tokenmill.train.loop as train_module
    from tokenmill.parallel.engine import Engine

    starts: list[tuple[float, float]] = []
    real_fb = Engine.forward_backward

    def forward_backward(engine, *args, **kwargs):
        starts.append(now())
        return real_fb(engine, *args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(
            precision, [*cfg_overrides, f"train.max_steps={steps + WARMUP + 1}", f"train.out_dir={tmp}/run"]
        )
        real_build = train_module.build_loader
        Engine.forward_backward = forward_backward
        if batch is not None:
            train_module.build_loader = lambda *args, **kwargs: FixedBatches(batch)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result = train_module.train(cfg)
        finally:
            Engine.forward_backward, train_module.build_loader = real_fb, real_build
        if result.status != "completed":
            raise RuntimeError(f"benchmark run ended {result.status}")
    return step_times(starts)


def check_equal_shape(cfg) -> int:
    """Both models have the same parameters (so the same FLOPs per token); returns the count."""
    from tokenmill.model import build_model

    ours = sum(p.numel() for p in build_model(cfg.model).parameters())
    theirs = sum(p.numel() for p in nano.GPT(shape_of(cfg)).parameters())
    if ours != theirs:
        raise SystemExit(f"parameter counts differ: tokenmill {ours:,} vs nanoGPT reference {theirs:,}")
    return ours


def prepare_tokenizer(folder: Path, train_chars: int) -> str:
    """Train the demo's BPE (4096 tokens) on stdlib once; returns its path for data.tokenizer."""
    from tokenmill.config import load_config
    from tokenmill.data.tokenizer import build_tokenizer

    cfg = load_config(["demo"], None, [f"data.tokenizer_train_chars={train_chars}"])
    with contextlib.redirect_stderr(io.StringIO()):
        build_tokenizer(cfg.data, folder)
    return str(next(folder.glob("tokenizer-bpe*")) / "tokenizer.json")


def variants(
    precision: str, compiled: bool, tokenizer: str, extra: list[str], steps: int
) -> dict[str, Callable[[], Times]]:
    """name -> one round of that variant, for one setting."""
    cfg = bench_config(precision, extra)
    batch = fixed_batch(cfg)
    base = [*extra, f"train.compile={compiled}"]
    data = [*base, f"data.tokenizer={tokenizer}"]
    if not compiled:
        return {
            "nanogpt": lambda: nanogpt_round(cfg, batch, steps, False),
            "bare": lambda: bare_round(cfg, batch, steps),
            "tokenmill": lambda: tokenmill_round(base, precision, steps, batch),
            "tokenmill+data": lambda: tokenmill_round(data, precision, steps, None),
        }
    return {
        "nanogpt": lambda: nanogpt_round(cfg, batch, steps, True),
        "tokenmill (model)": lambda: tokenmill_round([*base, "train.compile_scope=model"], precision, steps, batch),
        "tokenmill (blocks)": lambda: tokenmill_round([*base, "train.compile_scope=blocks"], precision, steps, batch),
        "tokenmill+data (auto)": lambda: tokenmill_round(data, precision, steps, None),
    }


def run_setting(rounds: int, runs: dict[str, Callable[[], Times]]) -> dict[str, list[Times]]:
    """`rounds` rounds of every variant, back to back, the order rotated each round."""
    names = list(runs)
    out: dict[str, list[Times]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(runs[name]())
            print(".", end="", flush=True, file=sys.stderr)
    return out


def table_rows(label: str, results: dict[str, list[Times]], tokens: int) -> list[str]:
    rows = []
    ref = results["nanogpt"]
    for name, per_round in results.items():
        cpu = statistics.median([t for times in per_round for t in times["cpu"]])
        wall = statistics.median([t for times in per_round for t in times["wall"]])
        ratios = {
            clock: [
                statistics.median(n[clock]) / statistics.median(v[clock]) for n, v in zip(ref, per_round, strict=True)
            ]
            for clock in ("cpu", "wall")
        }
        cells = [
            label,
            name,
            f"{1000 * cpu:.0f}",
            f"{tokens / cpu:,.0f}",
            f"{tokens / wall:,.0f}",
        ]
        for clock in ("cpu", "wall"):
            r = ratios[clock]
            cells.append(f"{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]" if name != "nanogpt" else "1")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per setting")
    parser.add_argument("--settings", default="fp32,bf16,compile", help="comma list of fp32, bf16, compile")
    parser.add_argument("--skip", action="append", default=[], help="leave out a run, e.g. bare (not nanogpt)")
    parser.add_argument("--tokenizer-chars", type=int, default=5_000_000, help="stdlib characters the BPE trains on")
    parser.add_argument("--override", action="append", default=[], help="config override for every tokenmill side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Compiled rounds build fresh models that reuse the graphs of the first round (parameters are graph inputs);
    # a generous limit keeps any recompile from silently falling back to eager.
    torch._dynamo.config.recompile_limit = 64
    work = tempfile.TemporaryDirectory(prefix="step-overhead-")
    # a private Inductor cache (removed at exit) and datasets cache (stdlib converted to Arrow once)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{work.name}/inductor"
    os.environ["HF_DATASETS_CACHE"] = f"{work.name}/datasets"
    load_before = os.getloadavg()
    cfg = bench_config("fp32", args.override)
    n_params = check_equal_shape(cfg)
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    print(
        f"step_overhead: {time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s), load average {load_before[0]:.1f}\n"
        f"model: {cfg.model.n_layers} layers, d={cfg.model.d_model}, vocab {cfg.model.vocab_size}, {n_params:,} "
        f"parameters on both sides; batch {cfg.train.micro_batch_size} x {cfg.train.seq_len} = {tokens} "
        f"tokens/step; {args.rounds} rounds x {args.steps} steps\n"
    )
    tokenizer = prepare_tokenizer(Path(work.name) / "tokenizer", args.tokenizer_chars)
    header = (
        "setting",
        "run",
        "ms/step (CPU)",
        "tokens/s (CPU)",
        "tokens/s (wall)",
        "vs nanoGPT (CPU) [range]",
        "vs nanoGPT (wall) [range]",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in args.settings.split(","):
        precision, compiled = SETTINGS[name]
        label = f"{precision}+compile" if compiled else precision
        runs = variants(precision, compiled, tokenizer, args.override, args.steps)
        results = run_setting(args.rounds, {k: v for k, v in runs.items() if k == "nanogpt" or k not in args.skip})
        lines.extend(table_rows(label, results, tokens))
        print(f" {label} done", file=sys.stderr)
    print("\n".join(lines))
    load_after = os.getloadavg()
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

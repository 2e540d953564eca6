"""Decode speed of the generation engine: KV cache vs full recompute vs transformers' `generate`. Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/decode.py [--models tiny,gpt2-124m] [--batches 1,8] [--rounds 3]

For each device (the CPU, and a CUDA GPU when one is present), preset (random init, fp32) and batch size, every
method generates `--new-tokens` tokens per row greedily after a `--prompt-tokens` prompt (random ids, the same
for every method):
- kv cache: `tokenmill.generation.Generator` (prefill, then one token per step; detokenizes as it goes), given
  the model as `tokenmill generate` does (`exclusive=True`: on a CPU the weights are stored column-major and each
  step is one call into the compiled C step, or the Python step without a C compiler);
- kv compiled: the same with `compile=True` (static cache, decode step compiled by Inductor, CUDA graphs on a
  GPU; compile time is in the warm-up, not in the timing);
- full recompute: the whole sequence through `model(ids, last_only=True)` and an argmax for every new token,
  which is what tokenmill's sampler did before the cache, on the model as built (contiguous weights). Its step
  time grows with the length, so it is timed at `--recompute-points` evenly spaced lengths and integrated
  (trapezoid rule) over all steps;
- transformers: `generate(do_sample=False, min_new_tokens=N)` on the same weights (`tokenmill.interop.hf.to_hf`,
  the exported model's classes and layout).
- matmuls only (CPU): the decode step's matrix products alone, one (batch, in) @ W per weight matrix of the
  fused step (q/k/v, o, gate/up and down of every layer, the head) in its decode layout, through NumPy's BLAS
  (one thread; the Python step's products, a little faster than the C step's own loops), once per new token:
  the rate kv cache would reach if everything else cost nothing, so `matmuls / recompute` is the ceiling of
  `kv / recompute` on this machine under this load.
EOS is disabled for every method (random weights emit it at random), so each row produces exactly N tokens.
Tokens/s = rows x new tokens / seconds (prefill included). On the CPU, seconds are the process's CPU time: with
one torch thread that is the work done, less affected by other jobs on a shared machine (wall time there
measures the neighbours); on a GPU, wall time after a synchronize. All methods run back to back in each of
`--rounds` rounds; the table shows the median round, the ratios are medians of the per-round ratios (two
methods in one round ran under the same machine load), and `round spread` is the noise band: the largest
slowest / fastest round - 1 of any method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class NoEosTokenizer:
    """The byte tokenizer's decoding with an EOS id no model emits, so every row runs its full budget."""

    eos_id = -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 128 for i in ids).decode("ascii")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def build(preset: str) -> torch.nn.Module:
    import tokenmill

    # tiny: the demo's 4096-token BPE vocab, and room for prompt + 256 new tokens (its preset context is 256)
    overrides = {"vocab_size": 4096, "max_seq_len": 512} if preset == "tiny" else {}
    torch.manual_seed(0)
    from tokenmill.api import model_config_from

    cfg = model_config_from(preset)
    return tokenmill.create_model({**cfg.__dict__, **overrides}).eval()


def clock(device: torch.device) -> float:
    """CPU: process CPU seconds (see the module docstring); GPU: wall seconds once queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = clock(device)
    fn()
    return clock(device) - start


def kv_cache_runner(model, prompts: torch.Tensor, new: int, compile_: bool = False) -> Callable[[], object]:
    """A warmed-up call generating `new` tokens per prompt with the engine (compiling first if asked)."""
    from tokenmill.generation import Generator, SamplingParams

    tokenizer = NoEosTokenizer(model.cfg.vocab_size)
    gen = Generator(model, tokenizer, max_batch_size=prompts.shape[0], compile=compile_, exclusive=True)
    params = SamplingParams(max_new_tokens=new, temperature=0)
    ids = prompts.tolist()
    warm = gen.generate(ids, params)  # warm-up: allocates the cache (and compiles)
    if any(len(c.token_ids) != new for c in warm):
        raise SystemExit(f"the engine stopped early: {[len(c.token_ids) for c in warm]} tokens, wanted {new}")
    return lambda: gen.generate(ids, params)


def transformers_runner(model, prompts: torch.Tensor, new: int) -> Callable[[], object]:
    """A warmed-up call of transformers' greedy `generate` on the same weights, exactly `new` tokens."""
    from tokenmill.interop.hf import to_hf

    hf = to_hf(model)
    prompts = prompts.to(model.output_weight().device)
    kwargs = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": 0, "eos_token_id": None}

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return hf.generate(prompts, **kwargs)

    if run().shape[1] != prompts.shape[1] + new:  # warm-up
        raise SystemExit("transformers stopped early")
    return run


def matmul_runner(model, batch: int, new: int) -> Callable[[], object] | None:
    """The decode step's matrix products alone, `new` times (see the module docstring); None off the CPU."""
    from tokenmill.generation.decode_step import build_decode_step

    step = build_decode_step(copy.deepcopy(model), native=False)  # the arrays of the Python step
    if step is None:
        return None
    weights = [w for layer in step.layers for w in (layer.qkv_t, layer.o_t, layer.up_t, layer.down_t)]
    weights.append(step.head_t)  # NumPy arrays on the step's memory: it multiplies through NumPy's BLAS
    inputs = [np.random.default_rng(0).standard_normal((batch, w.shape[0]), dtype=np.float32) for w in weights]
    one_thread = ThreadpoolController().select(user_api="blas")  # as the step does

    def run() -> None:
        with one_thread.limit(limits=1):
            for _ in range(new):
                for x, w in zip(inputs, weights, strict=True):
                    np.dot(x, w)

    run()  # warm-up
    return run


def recompute_timer(model, prompts: torch.Tensor, new: int, points: int) -> Callable[[], float]:
    """A function returning the seconds of `new` full-recompute steps, integrated from `points` timed lengths."""
    device = model.output_weight().device
    B, P = prompts.shape
    lengths = [P + round(i * (new - 1) / (points - 1)) for i in range(points)]
    inputs = [
        torch.randint(0, model.cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(n)).to(device)
        for n in lengths
    ]

    @torch.inference_mode()
    def timed() -> float:
        step = [seconds(lambda ids=ids: model(ids, last_only=True)[:, -1].argmax(-1), device) for ids in inputs]
        # trapezoid over step index: step k runs on length P + k, k = 0 .. new-1; it covers new-1 intervals,
        # and the one step more is the mean of the two ends
        pairs = zip(itertools.pairwise(lengths), itertools.pairwise(step), strict=True)
        total = sum((t0 + t1) / 2 * (l1 - l0) for (l0, l1), (t0, t1) in pairs)
        return total + (step[0] + step[-1]) / 2

    with torch.inference_mode():
        model(inputs[0], last_only=True)  # warm-up
    return timed


def paired_rounds(
    runners: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each runner in `rounds` rounds; within a round the runners go back to back, so a ratio of two
    runners' times in one round compares them under the same machine load. A runner returning a float (the
    recompute timer) reports its own seconds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = clock(device)
            out = run()
            times[name].append(out if isinstance(out, float) else clock(device) - start)
    return times


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return name


def median_ratio(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """How many times faster `fast` ran than `slow`: the median of the per-round ratios."""
    if slow not in times or fast not in times:
        return "-"
    return f"{statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True)):.2f}x"


def spread(times: dict[str, list[float]]) -> float:
    """The noise band: the largest relative spread (slowest / fastest round - 1) of any method."""
    return max(max(t) / min(t) - 1 for t in times.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gpt2-124m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds of every method")
    parser.add_argument("--recompute-points", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--devices", default="auto", help="comma-separated cpu/cuda; auto = cpu, and cuda if present")
    parser.add_argument("--skip-recompute", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode column")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    devices = args.devices.split(",") if args.devices != "auto" else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    gpu = f" | {torch.cuda.get_device_name()}" if "cuda" in devices else ""
    print(
        f"# {datetime.date.today()} | {cpu_name()} | {os.cpu_count()} cores, {args.threads} torch thread(s){gpu} | "
        f"load {os.getloadavg()[0]:.1f} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"commit {git_commit()}"
    )
    print(f"# {args.new_tokens} new tokens per row after a {args.prompt_tokens}-token prompt, greedy, fp32")
    print(
        "| device | model | batch | kv cache tok/s | kv compiled tok/s | full recompute tok/s | transformers tok/s | "
        "kv / recompute | kv / transformers | compiled / transformers | round spread | matmuls only tok/s | "
        "matmuls / recompute |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for device in (torch.device(d) for d in devices):
        for preset in args.models.split(","):
            model = build(preset).to(device)  # as built: contiguous weights, for transformers and recompute
            for batch in (int(b) for b in args.batches.split(",")):
                prompts = torch.randint(0, 256, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
                runners = {
                    "hf": transformers_runner(model, prompts, args.new_tokens),
                    "kv": kv_cache_runner(copy.deepcopy(model), prompts, args.new_tokens),
                }
                if not args.no_compile:
                    runners["compiled"] = kv_cache_runner(copy.deepcopy(model), prompts, args.new_tokens, compile_=True)
                if not args.skip_recompute:
                    runners["recompute"] = recompute_timer(model, prompts, args.new_tokens, args.recompute_points)
                if (matmuls := matmul_runner(model, batch, args.new_tokens)) is not None:
                    runners["matmuls"] = matmuls
                times = paired_rounds(runners, args.rounds, device)
                rate = {name: f"{batch * args.new_tokens / statistics.median(t):.1f}" for name, t in times.items()}
                print(
                    f"| {device.type} | {preset} | {batch} | {rate['kv']} | {rate.get('compiled', '-')} | "
                    f"{rate.get('recompute', '-')} | {rate['hf']} | {median_ratio(times, 'recompute', 'kv')} | "
                    f"{median_ratio(times, 'hf', 'kv')} | {median_ratio(times, 'hf', 'compiled')} | "
                    f"{spread(times):.0%} | {rate.get('matmuls', '-')} | "
                    f"{median_ratio(times, 'recompute', 'matmuls')} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Decode speed of the generation engine: KV cache vs full recompute vs transformers' `generate`. Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/decode.py [--models tiny,gpt2-124m] [--batches 1,8] [--rounds 3]

For each preset (random init, fp32, CPU) and batch size, every method generates `--new-tokens` tokens per row
greedily after a `--prompt-tokens` prompt (random ids, the same for every method):
- kv cache: `tokenmill.generation.Generator` (prefill, then one token per step; detokenizes as it goes);
- kv compiled: the same with `compile=True` (static cache, decode step compiled by Inductor; compile time is
  in the warm-up, not in the timing);
- full recompute: the whole sequence through `model(ids, last_only=True)` for every new token, which is what
  tokenmill's sampler did before the cache. Its step time grows with the length, so it is timed at
  `--recompute-points` evenly spaced lengths and integrated (trapezoid rule) over all steps;
- transformers: `generate(do_sample=False, min_new_tokens=N)` on the same weights (`tokenmill.interop.hf.to_hf`).
EOS is disabled for every method (random weights emit it at random), so each row produces exactly N tokens.
Tokens/s = rows x new tokens / seconds (prefill included), where seconds are the process's CPU time: with one
torch thread that is the work done, less affected by other jobs on a shared machine (wall time there measures
the neighbours). kv cache, transformers and kv compiled run back to back in each of `--rounds` rounds; the
table shows the median round, and kv / transformers is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def clock() -> float:
    """Process CPU seconds (see the module docstring: with one thread, free of other jobs' interference)."""
    return time.process_time()


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return clock() - start


def kv_cache_runner(model, prompts: torch.Tensor, new: int, compile_: bool = False) -> Callable[[], object]:
    """A warmed-up call generating `new` tokens per prompt with the engine (compiling first if asked)."""
    from tokenmill.generation import Generator, SamplingParams

    gen = Generator(model, NoEosTokenizer(model.cfg.vocab_size), max_batch_size=prompts.shape[0], compile=compile_)
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
    kwargs = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": 0, "eos_token_id": None}

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return hf.generate(prompts, **kwargs)

    if run().shape[1] != prompts.shape[1] + new:  # warm-up
        raise SystemExit("transformers stopped early")
    return run


def paired_rounds(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each runner in `rounds` rounds; within a round the runners go back to back, so a ratio
    of two runners' times in one round compares them under the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(cpu_seconds(run))
    return times


@torch.inference_mode()
def time_recompute(model, prompts: torch.Tensor, new: int, points: int) -> float:
    """Seconds for `new` full-recompute steps, integrated from steps timed at `points` lengths."""
    B, P = prompts.shape
    lengths = [P + round(i * (new - 1) / (points - 1)) for i in range(points)]
    model(prompts, last_only=True)  # warm-up
    step = []
    for length in lengths:
        ids = torch.randint(0, model.cfg.vocab_size, (B, length), generator=torch.Generator().manual_seed(length))
        start = clock()
        model(ids, last_only=True)[:, -1].argmax(-1)
        step.append(clock() - start)
    # trapezoid over step index: step k runs on length P + k, k = 0 .. new-1
    total = 0.0
    for (l0, t0), (l1, t1) in zip(
        zip(lengths, step, strict=False), zip(lengths[1:], step[1:], strict=False), strict=False
    ):
        total += (t0 + t1) / 2 * (l1 - l0)
    return total + (step[0] + step[-1]) / 2  # the trapezoid covers new-1 intervals; add one step


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gpt2-124m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (kv, transformers, compiled)")
    parser.add_argument("--recompute-points", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-recompute", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    print(
        f"# {datetime.date.today()} | {cpu} | {os.cpu_count()} cores, {args.threads} torch thread(s) | "
        f"load {os.getloadavg()[0]:.1f} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"commit {git_commit()}"
    )
    print(f"# {args.new_tokens} new tokens per row after a {args.prompt_tokens}-token prompt, greedy, fp32, CPU")
    print(
        "| model | batch | kv cache tok/s | kv compiled tok/s | full recompute tok/s | transformers tok/s | "
        "kv / recompute | kv / transformers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        model = build(preset)
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(0, 256, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
            tokens = batch * args.new_tokens
            runners = {
                "kv": kv_cache_runner(model, prompts, args.new_tokens),
                "hf": transformers_runner(model, prompts, args.new_tokens),
            }
            if not args.no_compile:
                runners["compiled"] = kv_cache_runner(model, prompts, args.new_tokens, compile_=True)
            times = paired_rounds(runners, args.rounds)
            rate = {name: tokens / statistics.median(t) for name, t in times.items()}
            kv_vs_hf = statistics.median(h / k for k, h in zip(times["kv"], times["hf"], strict=True))
            compiled = f"{rate['compiled']:.1f}" if "compiled" in rate else "-"
            if args.skip_recompute:
                full, ratio = "-", "-"
            else:
                full_rate = tokens / time_recompute(model, prompts, args.new_tokens, args.recompute_points)
                full, ratio = f"{full_rate:.1f}", f"{rate['kv'] / full_rate:.1f}x"
            print(
                f"| {preset} | {batch} | {rate['kv']:.1f} | {compiled} | {full} | {rate['hf']:.1f} | {ratio} | "
                f"{kv_vs_hf:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()

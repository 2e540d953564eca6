"""One-call GPU benchmark suite: tokens/s, MFU, memory against `tokenmill estimate`, and 50-step loss parity of
each speed lever against plain bf16. Prints a markdown table and writes it with a JSON file; not a test.

    python benchmarks/gpu_suite.py [--out runs/gpu_suite] [--budget-s 420] [--steps 50]
    python benchmarks/gpu_suite.py --smoke      # tiny shapes, a few steps, on the CPU (run by the tests)

Models gpt2-124m, dense-180m and llama3-1b at seq 2048 (gpt2-124m's position table widened to 2048), bf16
autocast, torch.compile per block, dropout 0, one GPU. Every configuration builds a fresh model from the same
seed and trains `--steps` optimizer steps through tokenmill's Engine (the trainer's micro-step, clip, AdamW and
schedule) on the same synthetic batches: a fixed random Markov chain over the vocabulary (4 successors per
token), so the loss falls from ln V towards ln 4 and curves can be compared. Levers: activation checkpointing
(every 2nd block, all), train.loss_impl (chunked, liger, cce), train.fp8 (tensorwise, rowwise), and flex vs sdpa
attention with document masking (random document lengths of 64-1024 tokens).

Measured per configuration: tokens/s over the steps after the first 5 (compile and warm-up excluded; one host
sync at each end of that window), MFU against the GPU's dense bf16 peak (metrics/flops.py, 6N + 12LHS FLOPs per
token), the allocator's peak allocated and reserved memory, `tokenmill estimate`'s predicted peak for the same
configuration, and the mean loss over the last 10 steps against its reference run's (plain bf16; flex's
reference is sdpa with document masking): parity holds within the lever's tolerance.

Time: the configurations run in priority order (the three baselines first) and a configuration is skipped when
its predicted time (compile, then the steps at 40% MFU) would overrun `--budget-s`, so one H100/H200 finishes
within 8 minutes. The micro-batch of each model is the largest that `tokenmill estimate` fits for the plain bf16
run on this GPU's memory (at most 16); a configuration that still runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MODELS = ("gpt2-124m", "dense-180m", "llama3-1b")
SEQ_LEN = 2048
MAX_MICRO_BATCH = 16
WARMUP_STEPS = 5  # excluded from tokens/s: compile happens in the first, allocator warm-up in the next
PARITY_WINDOW = 10  # steps whose mean loss is compared with the reference run's
SUCCESSORS = 4  # each token of the synthetic Markov chain has this many equally likely successors
BATCH_POOL = 4  # distinct synthetic batches, cycled
COMPILE_GUESS_S = 60.0  # first compile of a model (later configurations of it use the measured time)
PLANNING_MFU = 0.4
BASE = (
    "model.dropout=0.0",
    f"model.max_seq_len={SEQ_LEN}",
    f"train.seq_len={SEQ_LEN}",
    "train.precision=bf16",
    "train.compile=true",
    "train.loss_impl=torch",
    "train.loss_chunk_size=0",
    "schedule.warmup_steps=5",
    "train.device=cuda",
)
# CPU smoke: the same code path on tiny shapes (eager, fp32, a few steps)
SMOKE = (
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.vocab_size=256",
    "model.dropout=0.0",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.precision=fp32",
    "train.compile=false",
    "train.loss_impl=torch",
    "train.loss_chunk_size=0",
    "schedule.warmup_steps=1",
    "train.device=cpu",
)


@dataclass(frozen=True)
class Lever:
    """One configuration on top of a model's plain bf16 run."""

    name: str
    overrides: tuple[str, ...] = ()
    tolerance: float = 0.0  # allowed |mean loss over the last steps - the reference's|
    reference: str = "bf16"
    document_masking: bool = False
    cuda_only: str = ""  # why it cannot run on a CPU ("" = it can)


LEVERS = {
    lever.name: lever
    for lever in (
        Lever("bf16"),
        Lever("ac-every-2", ("train.activation_checkpointing=every_k", "train.ac_every=2"), tolerance=0.02),
        Lever("ac-all", ("train.activation_checkpointing=all",), tolerance=0.02),
        Lever("loss-chunked", ("train.loss_impl=chunked", "train.loss_chunk_size=4096"), tolerance=0.02),
        Lever("loss-liger", ("train.loss_impl=liger",), tolerance=0.02),
        Lever("loss-cce", ("train.loss_impl=cce",), tolerance=0.02),
        Lever("fp8-tensorwise", ("train.fp8=tensorwise",), tolerance=0.05),
        Lever("fp8-rowwise", ("train.fp8=rowwise",), tolerance=0.05),
        Lever("sdpa-docmask", ("model.attention=sdpa",), reference="sdpa-docmask", document_masking=True),
        Lever(
            "flex-docmask",
            ("model.attention=flex",),
            tolerance=0.02,
            reference="sdpa-docmask",
            document_masking=True,
            cuda_only="flex attention has no CPU backward in torch 2.13",
        ),
    )
}
# Priority order: the targets first (baselines; FP8 at 1B), then what each lever costs or saves.
PLAN = [(m, "bf16") for m in MODELS] + [
    ("llama3-1b", "fp8-tensorwise"),
    ("llama3-1b", "fp8-rowwise"),
    ("llama3-1b", "loss-cce"),
    ("llama3-1b", "loss-liger"),
    ("llama3-1b", "loss-chunked"),
    ("llama3-1b", "ac-every-2"),
    ("llama3-1b", "ac-all"),
    ("dense-180m", "sdpa-docmask"),
    ("dense-180m", "flex-docmask"),
    ("dense-180m", "fp8-tensorwise"),
    ("dense-180m", "loss-cce"),
    ("gpt2-124m", "fp8-tensorwise"),
    ("gpt2-124m", "loss-cce"),
]


@dataclass
class Row:
    model: str
    lever: str
    status: str = "ok"  # ok | skipped | OOM | failed
    note: str = ""
    micro_batch: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    estimate_gib: float | None = None
    compile_s: float | None = None
    losses: list[float] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)


# ---- data -------------------------------------------------------------------------------------------------------


def markov_batches(vocab: int, micro_batch: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """BATCH_POOL batches of (B, T+1) tokens from a fixed random Markov chain, with document ids (B, T+1)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, SUCCESSORS), generator=g)
    batches = []
    for _ in range(BATCH_POOL):
        tokens = torch.empty(micro_batch, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (micro_batch,), generator=g)
        choice = torch.randint(0, SUCCESSORS, (micro_batch, seq_len), generator=g)
        for t in range(seq_len):
            tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
        lengths = torch.randint(min(64, seq_len), min(1024, seq_len) + 1, (micro_batch, seq_len + 1), generator=g)
        starts = torch.zeros(micro_batch, seq_len + 1, dtype=torch.long)
        for row in range(micro_batch):
            edges = lengths[row].cumsum(0)
            starts[row, edges[edges <= seq_len]] = 1
        batches.append({"tokens": tokens, "doc_ids": starts.cumsum(1)})
    return batches


# ---- one configuration ------------------------------------------------------------------------------------------


def config_for(model: str, lever: Lever, micro_batch: int, steps: int, smoke: bool) -> Any:
    from tokenmill.config import load_config

    base = SMOKE if smoke else BASE
    extra = (
        f"train.micro_batch_size={micro_batch}",
        f"train.max_steps={steps}",
        f"train.document_masking={str(lever.document_masking).lower()}",
    )
    return load_config([model], None, [*base, *lever.overrides, *extra])


def predicted_peak_gib(cfg: Any, micro_batch: int) -> float | None:
    """`tokenmill estimate`'s bf16-mixed peak for this configuration (None where it has no model: every_k AC)."""
    from tokenmill.metrics.estimate import estimate
    from tokenmill.metrics.flops import GPUS

    if cfg.train.activation_checkpointing == "every_k":
        return None
    report = estimate(cfg, GPUS["H100 SXM"], micro_batch=micro_batch)  # the memory plan does not depend on the GPU
    mode = "bf16-mixed" if cfg.train.precision == "bf16" else "fp32"
    ac = "all" if cfg.train.activation_checkpointing == "all" else "none"
    return report["memory"]["plan"][mode]["peak_total"][ac] / 2**30


def train_steps(cfg: Any, batches: list[dict[str, torch.Tensor]], steps: int) -> tuple[list[float], float, float]:
    """(losses, seconds of the steps after the warm-up, seconds of the first step) with the trainer's parts."""
    from tokenmill.model import build_meta
    from tokenmill.optim.optimizers import build_optimizer
    from tokenmill.optim.schedules import build_scheduler
    from tokenmill.parallel.dist import DistInfo
    from tokenmill.parallel.engine import build_engine
    from tokenmill.train.precision import Precision

    device = torch.device(cfg.train.device)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    precision = Precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(build_meta(cfg.model), cfg, dist, precision)
    optimizer = engine.build_optimizer(lambda m: build_optimizer(m, cfg.optim))
    tokens_per_step = batches[0]["tokens"][:, 1:].numel()
    scheduler = build_scheduler(optimizer, cfg.schedule, steps, tokens_per_step)
    scaler = precision.make_scaler()
    losses: list[torch.Tensor] = []
    warm = min(WARMUP_STEPS, steps - 1)
    began = time.perf_counter()
    first = timed_from = 0.0
    for step in range(steps):
        if step == warm:
            sync(device)
            timed_from = time.perf_counter()
        losses.append(
            engine.forward_backward(batches[step % len(batches)], scaler, denominator=tokens_per_step, sync=True)
        )
        scaler.unscale_(optimizer)
        engine.clip_grad_norm(cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            sync(device)
            first = time.perf_counter() - began
    sync(device)
    elapsed = time.perf_counter() - timed_from
    return torch.stack(losses).float().tolist(), elapsed, first


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: only at the ends of the timed window


def run_config(
    row: Row, cfg: Any, batches: list[dict[str, torch.Tensor]], steps: int, peak_tflops: float | None
) -> None:
    from tokenmill.metrics.flops import flops_per_token, mfu

    device = torch.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_device = [
        {k: v.to(device) for k, v in b.items() if k == "tokens" or cfg.train.document_masking} for b in batches
    ]
    row.estimate_gib = predicted_peak_gib(cfg, row.micro_batch)
    row.losses, elapsed, row.compile_s = train_steps(cfg, on_device, steps)
    timed = steps - min(WARMUP_STEPS, steps - 1)
    row.tokens_per_s = timed * on_device[0]["tokens"][:, 1:].numel() / elapsed
    if peak_tflops:
        row.mfu = mfu(row.tokens_per_s, flops_per_token(cfg.model, cfg.train.seq_len), peak_tflops)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        row.reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30


def parity(row: Row, reference: Row | None, lever: Lever) -> dict[str, Any]:
    if lever.name == lever.reference or reference is None or not reference.losses or not row.losses:
        return {}
    n = min(PARITY_WINDOW, len(row.losses))
    mine, theirs = sum(row.losses[-n:]) / n, sum(reference.losses[-n:]) / n
    delta = mine - theirs
    return {
        "reference": lever.reference,
        "delta": delta,
        "tolerance": lever.tolerance,
        "ok": math.isfinite(delta) and abs(delta) <= lever.tolerance,
    }


# ---- the suite --------------------------------------------------------------------------------------------------


def micro_batch_for(model: str, smoke: bool, memory_gib: float) -> int:
    """The largest micro-batch `tokenmill estimate` fits for the plain bf16 run (at most MAX_MICRO_BATCH)."""
    if smoke:
        return 2
    from tokenmill.metrics import memory
    from tokenmill.model import param_counts

    cfg = config_for(model, LEVERS["bf16"], 1, 1, smoke=False)
    n = param_counts(cfg.model)["total"]
    fit = memory.max_micro_batch(cfg.model, memory.MODES["bf16-mixed"], n, SEQ_LEN, memory_gib, loss_impl="torch")
    return max(1, min(MAX_MICRO_BATCH, fit))


def predicted_seconds(cfg: Any, micro_batch: int, steps: int, compile_s: float, peak_tflops: float | None) -> float:
    from tokenmill.metrics.flops import flops_per_token

    if not peak_tflops:
        return compile_s
    step_flops = flops_per_token(cfg.model, cfg.train.seq_len) * micro_batch * cfg.train.seq_len
    return compile_s + steps * step_flops / (PLANNING_MFU * peak_tflops * 1e12)


def run_suite(args: argparse.Namespace) -> list[Row]:
    import torch._inductor.config as inductor_config

    from tokenmill.errors import UserError
    from tokenmill.metrics.monitor import detect_peak_tflops

    device = torch.device("cpu" if args.smoke else "cuda")
    peak_tflops, _ = detect_peak_tflops(device, "bf16")
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    started = time.perf_counter()
    rows: dict[tuple[str, str], Row] = {}
    compile_s: dict[str, float] = {}
    data: dict[str, list[dict[str, torch.Tensor]]] = {}
    for model, name in plan(args):
        lever = LEVERS[name]
        row = rows[(model, name)] = Row(model, name)
        if model not in data:
            row.micro_batch = micro_batch_for(model, args.smoke, memory_gib)
            probe = config_for(model, lever, row.micro_batch, args.steps, args.smoke)
            data[model] = markov_batches(probe.model.vocab_size, row.micro_batch, probe.train.seq_len)
        row.micro_batch = data[model][0]["tokens"].shape[0]
        cfg = config_for(model, lever, row.micro_batch, args.steps, args.smoke)
        left = args.budget_s - (time.perf_counter() - started)
        need = predicted_seconds(cfg, row.micro_batch, args.steps, compile_s.get(model, COMPILE_GUESS_S), peak_tflops)
        if lever.cuda_only and device.type != "cuda":
            row.status, row.note = "skipped", lever.cuda_only
        elif not args.smoke and need > left:
            row.status, row.note = "skipped", f"time budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left"
        else:
            inductor_settings = inductor_config.save_config()  # a lever may change them (FP8 rowwise does)
            try:
                run_config(row, cfg, data[model], args.steps, peak_tflops)
                compile_s.setdefault(model, row.compile_s or COMPILE_GUESS_S)
            except UserError as err:
                row.status, row.note = "skipped", str(err)
            except torch.OutOfMemoryError:
                row.status, row.note = "OOM", f"micro-batch {row.micro_batch} x {cfg.train.seq_len}"
            except Exception as err:  # one broken lever must not cost the rest of the suite
                row.status, row.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            finally:
                inductor_config.load_config(inductor_settings)
                release_memory()
        row.parity = parity(row, rows.get((model, lever.reference)), lever)
        print(format_row(row), flush=True)
    return list(rows.values())


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """PLAN's configurations that --models and --levers select, with the reference runs they compare with."""
    chosen = {
        (m, lever)
        for m, lever in PLAN
        if (not args.models or m in args.models) and (not args.levers or lever in args.levers)
    }
    needed = chosen | {(m, LEVERS[lever].reference) for m, lever in chosen}
    return [entry for entry in PLAN if entry in needed]  # PLAN lists every reference before its levers


def release_memory() -> None:
    """Drop the configuration's compiled graphs (Dynamo's recompile limit counts across models) and, on a GPU, its
    model: a collection and the allocator's cached blocks, so the next configuration's peaks are its own."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---- report -----------------------------------------------------------------------------------------------------

HEADER = (
    "model",
    "lever",
    "status",
    "micro-batch",
    "tokens/s",
    "MFU",
    "peak GiB",
    "reserved GiB",
    "estimate GiB",
    "first step s",
    "loss (last 10)",
    "Δ vs ref",
    "parity",
    "note",
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_row(row: Row) -> str:
    n = min(PARITY_WINDOW, len(row.losses))
    last = sum(row.losses[-n:]) / n if n else None
    p = row.parity
    cells = (
        row.model,
        row.lever,
        row.status,
        str(row.micro_batch or "-"),
        _num(row.tokens_per_s, ",.0f"),
        _num(row.mfu, ".1%"),
        _num(row.peak_gib, ".2f"),
        _num(row.reserved_gib, ".2f"),
        _num(row.estimate_gib, ".2f"),
        _num(row.compile_s, ".1f"),
        _num(last, ".4f"),
        _num(p.get("delta"), "+.4f"),
        ("pass" if p["ok"] else "FAIL") if p else "-",
        row.note.replace("|", "/"),
    )
    return "| " + " | ".join(cells) + " |"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)"
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "commit": commit,
        "torch": torch.__version__,
        "steps": args.steps,
        "budget_s": args.budget_s,
        "seq_len": SEQ_LEN,
    }


def write_report(rows: list[Row], env: dict[str, Any], seconds: float, out: Path) -> str:
    lines = [
        f"GPU suite {env['date']} on {env['device']}, commit {env['commit']}, torch {env['torch']}, "
        f"{env['steps']} steps per configuration, {seconds:.0f} s in all",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *(format_row(r) for r in rows),
    ]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.md").write_text(table)
    payload = {"environment": {**env, "seconds": seconds}, "rows": [asdict(r) for r in rows]}
    (out / "gpu_suite.json").write_text(json.dumps(payload, indent=2) + "\n")
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_suite"), help="folder for the .md and .json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all configurations (planned)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per configuration")
    parser.add_argument("--models", nargs="*", choices=MODELS, help="only these models (default all)")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), help="only these levers (and their references)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite runs")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA GPU here, nothing measured (python benchmarks/gpu_suite.py --smoke checks the "
            "suite on the CPU)"
        )
        return 0
    if args.smoke:
        args.steps = min(args.steps, 4)
    env = environment(args)
    print(f"gpu_suite: {env['date']}, {env['device']}, commit {env['commit']}, torch {env['torch']}", flush=True)
    print("| " + " | ".join(HEADER) + " |", flush=True)
    began = time.perf_counter()
    rows = run_suite(args)
    table = write_report(rows, env, time.perf_counter() - began, args.out)
    print(f"\n{table}\nwrote {args.out / 'gpu_suite.md'} and {args.out / 'gpu_suite.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample efficiency of training recipes: held-out bits per byte against tokens, on the demo corpus. Not a test.

    python benchmarks/recipe.py                                  # today's default vs the recipe, 2.05M tokens
    python benchmarks/recipe.py --recipes baseline,recipe,no-muon --tokens 512000 --seeds 0,1

Every recipe trains the `tiny` shape (4 layers, d=256) at 8 sequences x 256 tokens per step on the `stdlib`
corpus without machine-generated files, through the real `train()` loop, one thread per run (comparable on a
busy machine). The split and the tokenizer are fixed for all recipes:
- held out: the documents the hash split (`data.eval_fraction`, a BLAKE2b of the text) puts in eval;
- tokenizer: BPE of `--vocab` (8192) trained on the *train* documents only, once, cached in the work folder;
- evaluation: loss over the whole held-out split (one deterministic pass, `eval.max_batches=0`) at `--points`
  evenly spaced token counts, reported as bits per byte (tokenizer-independent).
Per recipe it prints bpb at each point, the tokens (and train-only wall seconds) needed to reach the target bpb,
linearly interpolated between points (default target: the first recipe's final bpb), tokens/s, wall and process
CPU time, and writes everything to `--out` (JSON). Process CPU time is the comparable clock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = [
    "train.seq_len=256",
    "train.micro_batch_size=8",
    "data.sources=[stdlib]",
    "data.stdlib_skip_generated=true",
    "eval.max_batches=0",
    "eval.sample_prompts=[]",
    "checkpoint.interval_steps=0",
    "log.interval_steps=25",
    "train.device=cpu",
    "train.precision=fp32",
]

# Each recipe is a list of overrides on top of the `tiny` preset and SHAPE. "baseline" pins the settings that
# were tokenmill's defaults before the recipe (AdamW 3e-3, betas 0.9/0.95, cosine to 0.1x, tied embeddings,
# SwiGLU, no QK-norm; warmup 100 steps, which is a tenth of a 2.05M-token run: {tenth} keeps that tenth when
# --tokens is smaller, {fiftieth} is a fiftieth), so it stays comparable when the defaults change.
BASELINE = [
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.betas=[0.9,0.95]",
    "schedule.name=cosine",
    "schedule.warmup_tokens={tenth}",
    "schedule.min_lr_ratio=0.1",
    "model.qk_norm=false",
    "model.tie_embeddings=true",
    "model.ffn=swiglu",
    "model.activation=silu",
    "model.logit_softcap=0",
    "model.z_loss=0",
    "optim.embedding_lr=0",
    "optim.head_lr=0",
    "optim.scalar_lr=0",
]
# The recipe: tokenmill's current defaults (the warmup kept at a tenth of the run, like the baseline's).
# Ablations flip one ingredient each; the architecture options change the model, so they are opt-in.
RECIPE = ["schedule.warmup_tokens={tenth}"]
RECIPES: dict[str, list[str]] = {
    "baseline": BASELINE,
    "nanogpt": BASELINE + ["optim.lr=1e-3", "optim.betas=[0.9,0.99]"],
    "recipe": RECIPE,
    "recipe-cosine": RECIPE + ["schedule.name=cosine"],
    "recipe-adamw": RECIPE + ["optim.name=adamw"],
    "recipe-qknorm": RECIPE + ["model.qk_norm=false"],  # the default before QK-norm joined it
    "recipe+untied": RECIPE + ["model.tie_embeddings=false"],
    "recipe+relu2": RECIPE + ["model.ffn=mlp", "model.activation=relu2"],
    "recipe+softcap": RECIPE + ["model.logit_softcap=30"],
    "recipe+zloss": RECIPE + ["model.z_loss=1e-4"],
    "recipe+embed-lr": RECIPE + ["optim.embedding_lr=1e-2"],
    "recipe+fan-in": RECIPE + ["model.init=fan_in"],
    "recipe+muon-lr": RECIPE + ["optim.muon_lr=0.04"],
    "recipe+long-decay": RECIPE + ["schedule.decay_ratio=0.4"],
    "recipe+zero-floor": RECIPE + ["schedule.min_lr_ratio=0"],
    "recipe+short-warmup": RECIPE + ["schedule.warmup_tokens={fiftieth}"],
    "recipe+batch4": RECIPE + ["train.micro_batch_size=4"],  # not the benchmark's shape: a probe of batch size
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="baseline,recipe", help=f"comma list of: {', '.join(RECIPES)}")
    p.add_argument("--tokens", type=int, default=2_048_000, help="training tokens per run (2048 per step in SHAPE)")
    p.add_argument("--points", type=int, default=8, help="evaluations, evenly spaced in tokens")
    p.add_argument("--seeds", default="0", help="comma list of seeds; every recipe runs once per seed")
    p.add_argument("--target-bpb", type=float, default=0.0, help="target bpb; 0 = the first recipe's final bpb")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on the train split")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="share of documents held out (by hash)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--tokenizer-docs", type=int, default=0, help="train the BPE on the first N train documents; 0 = all"
    )
    p.add_argument("--workdir", default="", help="folder for the tokenizer and runs; default: a temporary one")
    p.add_argument("--out", default="recipe_bench.json", help="JSON results file")
    p.add_argument("--run-one", default="", help=argparse.SUPPRESS)  # internal: one run in a child process
    return p.parse_args(argv)


def train_tokenizer(workdir: Path, vocab: int, eval_fraction: float, max_docs: int = 0) -> Path:
    """BPE on the train documents of the filtered stdlib (held-out documents never shape the vocabulary)."""
    import itertools

    from tokenmill.data.mixture import is_eval_doc
    from tokenmill.data.sources import StdlibSource
    from tokenmill.data.tokenizer import train_bpe

    folder = workdir / (f"tokenizer-bpe{vocab}-holdout{eval_fraction}" + (f"-docs{max_docs}" if max_docs else ""))
    if not (folder / "tokenizer.json").is_file():
        source = StdlibSource(skip_generated=True)
        texts = (t for t in (source.text(i) for i in range(len(source))) if not is_eval_doc(t, eval_fraction))
        train_bpe(itertools.islice(texts, max_docs or None), vocab, folder, progress=False)
    return folder / "tokenizer.json"


def tokens_per_step(name: str) -> int:
    """256 tokens per sequence times the recipe's sequences per step (SHAPE's 8 unless the recipe sets them)."""
    batch = [o.split("=")[1] for o in (*SHAPE, *RECIPES[name]) if o.startswith("train.micro_batch_size=")][-1]
    return 256 * int(batch)


def run_overrides(args: argparse.Namespace, name: str, seed: int, tokenizer: Path, out_dir: Path) -> list[str]:
    per_step = tokens_per_step(name)
    steps = args.tokens // per_step
    interval = max(1, steps // args.points) * per_step
    return [
        *SHAPE,
        f"data.tokenizer={tokenizer}",
        f"data.eval_fraction={args.eval_fraction}",
        f"train.max_steps={steps}",
        f"eval.interval_tokens={interval}",
        f"train.seed={seed}",
        f"train.out_dir={out_dir}",
        *(o.format(tenth=args.tokens // 10, fiftieth=args.tokens // 50) for o in RECIPES[name]),
    ]


def run_one(overrides: list[str], threads: int) -> dict[str, Any]:
    """Train one recipe in this process; return its curve and clocks."""
    import torch

    torch.set_num_threads(threads)
    from tokenmill.config import load_config
    from tokenmill.train.loop import train

    cfg = load_config(["tiny"], overrides=overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, overwrite=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    events = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    start = next(e["time"] for e in events if e["kind"] == "startup")
    points, eval_seconds = [], 0.0
    for e in events:
        if e["kind"] == "eval":
            eval_seconds += e["seconds"]
            train_wall = e["time"] - start - eval_seconds
            tokens = e["step"] * cfg.train.micro_batch_size * cfg.train.seq_len
            points.append({"tokens": tokens, "bpb": e["bpb"], "loss": e["loss"], "train_wall_s": train_wall})
    speeds = [e["tokens_per_s"] for e in events if e["kind"] == "train" and e.get("tokens_per_s")]
    return {
        "status": result.status,
        "points": points,
        "wall_s": wall,
        "cpu_s": cpu,
        "eval_s": eval_seconds,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def tokens_to_target(points: list[dict[str, Any]], target: float, key: str = "tokens") -> float | None:
    """`key` (tokens or train_wall_s) where the bpb curve first reaches `target`, linear between points."""
    prev = {"tokens": 0, "train_wall_s": 0.0, "bpb": float("inf")}
    for p in points:
        if p["bpb"] <= target:
            if prev["bpb"] == float("inf"):
                return float(p[key])
            frac = (prev["bpb"] - target) / (prev["bpb"] - p["bpb"])
            return prev[key] + frac * (p[key] - prev[key])
        prev = p
    return None


def spawn(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """One run in a fresh process (no state shared between recipes), one at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH")])
    )
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--run-one", out.name, "--threads", str(args.threads), "--", *overrides]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({' '.join(overrides[-4:])}):\n{proc.stderr[-2000:]}")
        return json.loads(Path(out.name).read_text())


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict[str, Any]], target: float) -> None:
    tokens = sorted({p["tokens"] for r in results for p in r["points"]})
    head = ["recipe", "seed"] + [f"{t / 1e6:.2f}M" for t in tokens]
    head += ["tok->target", "s->target", "tok/s", "wall s", "cpu s"]
    print(f"held-out bpb at N training tokens; target bpb {target:.4f}")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in results:
        bpb = {p["tokens"]: p["bpb"] for p in r["points"]}
        row = [r["recipe"], str(r["seed"])] + [fmt(bpb.get(t), ".4f") for t in tokens]
        row += [fmt(r["tokens_to_target"], ",.0f"), fmt(r["wall_to_target_s"], ".0f"), fmt(r["tokens_per_s"], ".0f")]
        row += [f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}"]
        print(" | ".join(row))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--run-one" in argv:  # child: --run-one OUT --threads N -- overrides...
        split = argv.index("--")
        args = parse_args(argv[:split])
        Path(args.run_one).write_text(json.dumps(run_one(argv[split + 1 :], args.threads)))
        return 0
    args = parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(workdir, args.vocab, args.eval_fraction, args.tokenizer_docs)
        results = []
        for name in names:
            for seed in seeds:
                out_dir = workdir / f"{name}-s{seed}-t{args.tokens}"
                overrides = run_overrides(args, name, seed, tokenizer, out_dir)
                saved = out_dir / "recipe_result.json"  # a finished run with the same overrides is reused
                run = json.loads(saved.read_text()) if saved.is_file() else None
                if run is None or run.get("overrides") != overrides:
                    run = {**spawn(args, overrides), "overrides": overrides}
                    saved.write_text(json.dumps(run))
                results.append({"recipe": name, "seed": seed, **run})
                print(
                    f"{name} seed {seed}: final bpb {run['points'][-1]['bpb']:.4f}, cpu {run['cpu_s']:.0f}s", flush=True
                )
    target = args.target_bpb or results[0]["points"][-1]["bpb"]
    for r in results:
        r["tokens_to_target"] = tokens_to_target(r["points"], target)
        r["wall_to_target_s"] = tokens_to_target(r["points"], target, "train_wall_s")
    print_table(results, target)
    here = Path(__file__).resolve().parent
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    commit = git.stdout.strip() or "unknown (not a git checkout)"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "tokens": args.tokens,
        "target_bpb": target,
        "recipes": {n: RECIPES[n] for n in names},
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny training configs and run inspection shared by the trainer tests (test_train*, test_levers, golden).

A "tiny run" is the `tiny` preset shrunk to 2 layers of width 64 on the byte tokenizer (vocab 256 + specials,
nothing to train), seq_len 32 and 4 sequences per micro-batch: a step takes milliseconds on one CPU thread,
so exact-resume and lever tests can afford several runs each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.checkpoint.folder import STATE
from tokenmill.checkpoint.weights import read_weights
from tokenmill.config import Config, load_config
from tokenmill.metrics.sinks import read_jsonl

# Overrides on top of the `tiny` preset; every test adds its own (steps, out_dir, levers...).
TINY_OVERRIDES: tuple[str, ...] = (
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "data.tokenizer=byte",
    "data.sources=[stdlib]",
    "data.shuffle_buffer=16",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.device=cpu",
    "eval.interval_steps=0",
    "eval.max_batches=2",
    "eval.sample_tokens=4",
    "eval.sample_prompts=[def]",
    "schedule.warmup_steps=2",
    "optim.lr=1e-2",
    "log.interval_steps=1",
    "log.progress_bar=false",
)


def tiny_overrides(out_dir: str | Path, steps: int, *extra: str) -> list[str]:
    """The tiny run's dotted overrides for `steps` optimizer steps into `out_dir`; `extra` wins."""
    return [*TINY_OVERRIDES, f"train.max_steps={steps}", f"train.out_dir={out_dir}", *extra]


def tiny_config(out_dir: str | Path, steps: int, *extra: str) -> Config:
    return load_config(["tiny"], None, tiny_overrides(out_dir, steps, *extra))


def cli_args(out_dir: str | Path, steps: int, *extra: str) -> list[str]:
    """`tokenmill train` arguments (after the program name) for the same tiny run."""
    return ["train", "--preset", "tiny", *("--" + o for o in tiny_overrides(out_dir, steps, *extra))]


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m tokenmill` children: one thread (the CI box has two shared cores)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def spawn_cli(args: list[str], code: str = "", **popen: Any) -> subprocess.Popen:
    """Start `tokenmill <args>` in a fresh interpreter, after running `code` (e.g. a monkeypatch) there."""
    script = (
        f"import sys, torch\ntorch.set_num_threads(1)\n{code}\n"
        f"from tokenmill.cli import main\nsys.exit(main({args!r}))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


# ---------------------------------------------------------------------------------------------------------
# reading a finished run


def events(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl", kind)


def logged_curve(run_dir: str | Path) -> list[tuple[int, float, float, float]]:
    """(step, loss, grad_norm, lr) of every train event in metrics.jsonl, in file order."""
    return [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in events(run_dir, "train")]


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `step_*` checkpoint folders (manifest written), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(p for p in folder.glob("step_*") if (p / "manifest.json").is_file())


def checkpoint_contents(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state.pt blob) of one checkpoint folder, loaded safely."""
    return read_weights(path), torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists/tensors/numbers (NaN equals NaN), naming the first difference."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        )
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_checkpoints_equal(left: str | Path, right: str | Path) -> None:
    """Weights and every other part (optimizer, scheduler, loader, loop state, ...) and the RNG states of two
    checkpoints are bitwise equal."""
    (w1, s1), (w2, s2) = checkpoint_contents(left), checkpoint_contents(right)
    assert_same(w1, w2, "weights")
    assert set(s1["parts"]) >= {"optimizer", "scheduler", "loader", "train", "detector"}
    for key in ("step", "rng", "parts"):
        assert_same(s1.get(key), s2.get(key), key)


# ---------------------------------------------------------------------------------------------------------
# the golden run (tests/train/golden/)

GOLDEN_STEPS = 20
GOLDEN_WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "and",
    "learns",
    "to",
    "predict",
    "the",
    "next",
    "one",
    "from",
    "the",
    "ones",
    "before",
    "it",
    "while",
    "loss",
    "falls",
    "as",
    "data",
    "flows",
    "through",
    "layers",
    "of",
    "attention",
    "and",
    "feed",
    "forward",
    "blocks",
    "def",
    "class",
    "import",
    "return",
    "self",
    "if",
    "else",
    "for",
    "in",
    "while",
    "with",
    "yield",
]


def write_golden_corpus(path: str | Path, n_docs: int = 400) -> Path:
    """A fixed text file, one document per line, from a hand-written LCG (Knuth MMIX constants).

    The golden run trains on this instead of `stdlib`: the standard library's files change with every
    Python release, and the golden curve must change only when tokenmill's numerics do.
    """
    state = 20240601
    lines = []
    for _ in range(n_docs):
        state = (6364136223846793005 * state + 1442695040888963407) % 2**64
        words = []
        for _ in range(8 + (state >> 33) % 40):
            state = (6364136223846793005 * state + 1442695040888963407) % 2**64
            words.append(GOLDEN_WORDS[(state >> 33) % len(GOLDEN_WORDS)])
        lines.append(" ".join(words))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def golden_overrides(out_dir: str | Path, corpus: str | Path) -> list[str]:
    """The golden run: the tiny run for GOLDEN_STEPS steps on the LCG corpus, fp32, fused AdamW, no dropout."""
    # data.shuffle_documents=false: the golden curve watches the numerics; it reads the corpus in file order
    return tiny_overrides(
        out_dir,
        GOLDEN_STEPS,
        f"data.sources=[{corpus}]",
        "data.shuffle_documents=false",
        "model.dropout=0.0",
        "optim.fused=true",
        "train.grad_clip=1.0",
    )


def golden_run(work_dir: str | Path) -> dict[str, Any]:
    """Run the golden config under `work_dir` (one torch thread) and return its curve as stored in the JSON."""
    import hashlib

    from tokenmill.train.loop import train

    work_dir = Path(work_dir)
    corpus = write_golden_corpus(work_dir / "golden_corpus.txt")
    cfg = load_config(["tiny"], None, golden_overrides(work_dir / "run", corpus))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    curve = logged_curve(result.run_dir)
    return {
        "steps": [s for s, *_ in curve],
        "losses": [loss for _, loss, _, _ in curve],
        "grad_norms": [g for _, _, g, _ in curve],
        "lrs": [lr for *_, lr in curve],
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "status": result.status,
    }


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count as the `python -m tokenmill` children, so in-process and child numerics agree.

    Autouse in every test module that imports it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

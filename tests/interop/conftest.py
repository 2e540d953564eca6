"""Fixtures of the interop and eval tests: a small BPE tokenizer and tiny saved runs of each HF architecture.

A saved run is a run folder holding one checkpoint of a tiny random model whose weights are perturbed (norm
weights != 1, biases != 0), so a swapped, untransposed or dropped tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interop_cases import ARCHES, TEXTS, tree


@pytest.fixture(scope="session")
def bpe_file(tmp_path_factory) -> Path:
    """tokenizer.json of a 320-id byte-level BPE (specials <|eos|>=0, <|bos|>=1, <|pad|>=2)."""
    from tokenmill.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(TEXTS, 320, folder, progress=False)
    return folder / "tokenizer.json"


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def make_run(tmp_path, bpe_file):
    """make_run(arch, *overrides, tokenizer=path|"byte", sharded=False, name="run") -> (run folder, model, cfg)."""
    from tokenmill.api import create_model
    from tokenmill.checkpoint.manager import Checkpointer
    from tokenmill.checkpoint.parts import ModelState
    from tokenmill.config import load_config

    def make(
        arch: str = "llama-gqa-tied",
        *overrides: str,
        tokenizer: str | Path | None = None,
        sharded: bool = False,
        name: str = "run",
        seed: int = 0,
    ):
        run = tmp_path / name
        tok = str(tokenizer or bpe_file)
        cfg = load_config(
            ["tiny"],
            overrides=[  # vocab 320 covers the BPE (320 ids) and the byte tokenizer (259)
                "model.n_layers=2",
                "model.d_model=64",
                "model.n_heads=4",
                "model.vocab_size=320",
                "model.max_seq_len=64",
                "model.ffn_hidden=96",
                *ARCHES[arch],
                *overrides,
                f"data.tokenizer={tok}",
                f"train.out_dir={run}",
                "train.seq_len=32",
            ],
        )
        torch.manual_seed(seed)
        model = create_model(cfg)
        perturb(model, seed + 1)
        model.eval()
        # a sharded save goes through DCP as an FSDP / pipeline run's does
        tokenizer_json = None if tok == "byte" else Path(tok).read_text()
        parts = {"model": ModelState(model, sharded=sharded)}
        Checkpointer(run, cfg.checkpoint, parts, run_config=cfg, tokenizer_json=tokenizer_json).save(1)
        return run, model, cfg

    return make


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, stdout, non-empty stderr lines) of `tokenmill ARGS` run in this process."""
    from tokenmill.cli import main

    def run(*args: str) -> tuple[int, str, list[str]]:
        capsys.readouterr()  # drop what earlier set-up printed
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, [line for line in err.splitlines() if line.strip()]

    return run


@pytest.fixture
def assert_refused(cli, tmp_path):
    """assert_refused(*args, match=...): exit 2, one `error:` line matching, no traceback, no file changed."""
    import re

    def check(*args: str, match: str) -> str:
        before = tree(tmp_path)
        code, _, err = cli(*args)
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        assert re.search(match, err[0]), err[0]
        assert tree(tmp_path) == before
        return err[0]

    return check

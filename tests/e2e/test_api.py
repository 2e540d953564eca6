"""tokenmill.create_model / load_model (SPEC C7): a saved run comes back as a ready model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tokenmill
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.config import load_config
from tokenmill.errors import UserError


def _saved_run(tmp_path, overrides=()):
    cfg = load_config(["tiny"], overrides=["model.vocab_size=128", "model.n_layers=2", "model.d_model=64",
                                          "model.n_heads=2", "model.n_kv_heads=1", *overrides])
    torch.manual_seed(0)
    model = tokenmill.create_model(cfg)
    ck = Checkpointer(tmp_path, cfg.checkpoint, config=cfg)
    first = ck.save(1, {}, model, eval_loss=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ck.save(2, {}, model, eval_loss=3.0)
    return model, first


def test_load_model_from_run_dir_matches_logits(tmp_path):
    model, _ = _saved_run(tmp_path)
    loaded = tokenmill.load_model(tmp_path)
    assert not loaded.training
    idx = torch.randint(0, 128, (2, 9))
    model.eval()
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.head is None  # tied model stays tied


def test_load_model_best_and_untied(tmp_path):
    model, first = _saved_run(tmp_path, ["model.tie_embeddings=false", "model.position=learned"])
    best = tokenmill.load_model(tmp_path, which="best")
    latest = tokenmill.load_model(tmp_path / "checkpoints")
    assert not torch.equal(best.head.weight, latest.head.weight)
    from tokenmill.checkpoint.manager import read_weights

    assert torch.equal(best.head.weight, read_weights(first)["head.weight"])
    assert torch.equal(latest.head.weight, model.head.weight)
    assert torch.equal(tokenmill.load_model(first).pos_emb.weight, best.pos_emb.weight)


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tokenmill.load_model(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no valid checkpoint"):
        tokenmill.load_model(tmp_path)
    with pytest.raises(UserError, match="which="):
        tokenmill.load_model(tmp_path, which="worst")


def test_create_model_from_preset_needs_vocab():
    with pytest.raises(UserError, match="vocab_size"):
        tokenmill.create_model("tiny")
    model = tokenmill.create_model("tiny", vocab_size=96)
    assert model.tok_emb.weight.shape[0] == 96


def test_import_is_lazy():
    code = "import sys, tokenmill; print('torch' in sys.modules, callable(tokenmill.load_model))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError):
        tokenmill.no_such_thing

"""tokenmill.create_model / load_model / load_tokenizer: a saved run, or one checkpoint folder alone, comes back as
a ready model and its tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tokenmill
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.weights import read_weights
from tokenmill.config import load_config
from tokenmill.errors import UserError


def _saved_run(tmp_path, overrides=()):
    cfg = load_config(
        ["tiny"],
        overrides=[
            "model.vocab_size=128",
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = tokenmill.create_model(cfg)
    ck = Checkpointer(tmp_path, cfg.checkpoint, {"model": model}, run_config=cfg)
    first = ck.save(1, eval_loss=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ck.save(2, eval_loss=3.0)
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
        _ = tokenmill.no_such_thing


@pytest.mark.slow
def test_a_checkpoint_folder_alone_holds_its_tokenizer(tmp_path):
    """`train` stores tokenizer.json in every checkpoint (listed in the manifest), so a copied folder is enough."""
    import json
    import shutil

    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.train.loop import train
    from train_helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", 1, "data.tokenizer=bpe", "data.tokenizer_vocab_size=300")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "tokenizer.json" in json.loads((folder / "manifest.json").read_text())["files"]
    alone = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, alone)
    shutil.rmtree(tmp_path / "run")  # no run folder, no tokenizer cache: the folder must be enough
    tokenizer = tokenmill.load_tokenizer(alone)
    cached = Tokenizer.from_file(alone / "tokenizer.json")
    assert tokenizer.hash == cached.hash and tokenizer.vocab_size == 300
    assert tokenizer.decode(tokenizer.encode("def f(x): return x")) == "def f(x): return x"
    assert tokenmill.load_model(alone).tok_emb.weight.shape[0] >= 300
    assert result.status == "completed"


def test_older_checkpoints_without_a_tokenizer_use_the_fallbacks(tmp_path):
    from tokenmill.data.tokenizer import train_bpe

    _saved_run(tmp_path / "byte", ["data.tokenizer=byte"])
    assert tokenmill.load_tokenizer(tmp_path / "byte").name == "byte"
    _saved_run(tmp_path / "bpe", ["data.tokenizer=bpe", "data.tokenizer_vocab_size=300"])
    with pytest.raises(UserError, match="no cached tokenizer"):
        tokenmill.load_tokenizer(tmp_path / "bpe")
    cache = tmp_path / "bpe" / "tokenizer" / "tokenizer-bpe300-abc"
    trained = train_bpe(["alpha beta gamma"] * 50, 300, cache, progress=False)
    assert tokenmill.load_tokenizer(tmp_path / "bpe").hash == trained.hash


def test_load_model_on_a_sharded_checkpoint_names_consolidate(tmp_path):
    from tokenmill.checkpoint.parts import ModelState

    cfg = load_config(
        ["tiny"],
        overrides=[
            "model.vocab_size=128",
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=2",
            "model.n_kv_heads=1",
        ],
    )
    model = tokenmill.create_model(cfg)
    path = Checkpointer(tmp_path, cfg.checkpoint, {"model": ModelState(model, sharded=True)}, run_config=cfg).save(3)
    with pytest.raises(UserError, match=r"sharded .*tokenmill checkpoint consolidate .*step_00000003 OUT_DIR"):
        tokenmill.load_model(tmp_path)
    assert (path / ".metadata").is_file()

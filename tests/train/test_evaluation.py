"""Held-out evaluation: max_batches=0 reads the whole (finite) eval set, a limit reads that many batches, and
masked targets count neither as loss nor as tokens."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from tokenmill.data.loader import build_loader
from tokenmill.data.tokenizer import build_tokenizer
from tokenmill.levers.loss import IGNORE_INDEX
from tokenmill.model import build_model
from tokenmill.parallel.dist import init_distributed
from tokenmill.train.evaluation import evaluate
from tokenmill.train.loop import resolve_model_vocab
from train_helpers import one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(root / "run", 1)
    tokenizer = build_tokenizer(cfg.data, root / "tokenizer")
    cfg = resolve_model_vocab(cfg, tokenizer)
    torch.manual_seed(0)
    return cfg, tokenizer, build_model(cfg.model)


def run(model, batches, max_batches, tokenizer, cfg):
    dist = init_distributed(cfg.parallel, "cpu")
    return evaluate(model, batches, max_batches, tokenizer.decode, contextlib.nullcontext, dist.device, dist)


def test_zero_max_batches_reads_the_whole_eval_set_and_a_limit_reads_that_many(setup):
    cfg, tokenizer, model = setup
    batches = list(build_loader(cfg, tokenizer, "eval"))
    assert len(batches) > 2  # a finite eval set, larger than the limit below
    whole = run(model, build_loader(cfg, tokenizer, "eval"), 0, tokenizer, cfg)
    assert whole["tokens"] == sum(b["tokens"][:, 1:].numel() for b in batches)
    two = run(model, build_loader(cfg, tokenizer, "eval"), 2, tokenizer, cfg)
    assert two["tokens"] == sum(b["tokens"][:, 1:].numel() for b in batches[:2])
    with torch.no_grad():
        nats = sum(float(model.loss(b["tokens"], reduction="sum")) for b in batches[:2])
    assert two["loss"] == pytest.approx(nats / two["tokens"], rel=1e-6)
    assert two["ppl"] == pytest.approx(math.exp(two["loss"]), rel=1e-9)


def test_masked_targets_count_neither_as_loss_nor_as_tokens(setup):
    cfg, tokenizer, model = setup
    batch = next(iter(build_loader(cfg, tokenizer, "eval")))
    targets = batch["tokens"][:, 1:].clone()
    targets[:, : targets.shape[1] // 2] = IGNORE_INDEX  # the first half of every row is a "prompt"
    result = run(model, [{**batch, "targets": targets}], 0, tokenizer, cfg)
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert result["tokens"] == int((targets != IGNORE_INDEX).sum())
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)

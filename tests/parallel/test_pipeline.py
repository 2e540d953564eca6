"""Pipeline layout rules (no processes needed) and the clear errors for what stages cannot run."""

from __future__ import annotations

import types

import pytest

from dist_helpers import tiny_config
from tokenmill.errors import UserError
from tokenmill.model import build_model
from tokenmill.parallel import pipeline as pl


def test_microbatch_rule_of_seed_004():
    assert pl.n_microbatches(2, "1F1B", 1) == 2
    assert pl.n_microbatches(4, "Interleaved1F1B", 1) == 8
    assert pl.n_microbatches(2, "ZBVZeroBubble", 3) == 12
    assert pl.check_microbatches(8, 2, "Interleaved1F1B", 2) == 8


def test_microbatch_error_names_the_numbers():
    with pytest.raises(UserError) as err:
        pl.check_microbatches(6, 2, "Interleaved1F1B", 1)
    msg = str(err.value)
    assert "train.micro_batch_size=6" in msg and "4 pipeline microbatches" in msg and "parallel.pp=2" in msg


def test_unknown_schedule():
    with pytest.raises(UserError, match="GPipe"):
        pl.schedule_info("Fancy")


def test_layer_split_and_stage_placement():
    assert pl.split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert pl.split_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(UserError, match="model.n_layers=3"):
        pl.split_layers(3, 4)
    assert pl.stage_ids_for_rank(1, 2, "1F1B") == [1]
    assert pl.stage_ids_for_rank(0, 2, "Interleaved1F1B") == [0, 2]
    assert pl.stage_ids_for_rank(0, 2, "ZBVZeroBubble") == [0, 3]  # V: rank 0 holds first and last


def test_split_keeps_full_model_names_and_covers_every_parameter():
    model = build_model(tiny_config().model)
    names = set()
    for rank in range(2):
        parts = pl.split_model(model, 2, rank, "Interleaved1F1B")
        for stage in parts.stages:
            names |= set(stage.state_dict())
        assert parts.has_first == (rank == 0) and parts.has_last == (rank == 1)
    assert names == set(model.state_dict())


def test_stages_chained_equal_the_model():
    import torch

    torch.manual_seed(0)
    model = build_model(tiny_config().model)
    idx = torch.randint(0, 64, (2, 8))
    stages = [s for r in range(2) for s in pl.split_model(model, 2, r, "GPipe").stages]
    x = idx
    for s in stages:
        x = s(x)
    torch.testing.assert_close(x, model(idx))


def test_configs_stages_cannot_run():
    cfg = tiny_config(pp=2)
    pl.check_pipeline_config(cfg)  # untied, causal: fine
    tied = types.SimpleNamespace(
        parallel=cfg.parallel, model=types.SimpleNamespace(tie_embeddings=True), train=cfg.train, data=cfg.data
    )
    with pytest.raises(UserError, match="tie_embeddings=false"):
        pl.check_pipeline_config(tied)
    docs = types.SimpleNamespace(
        parallel=cfg.parallel, model=cfg.model, train=types.SimpleNamespace(document_masking=True), data=cfg.data
    )
    with pytest.raises(UserError, match="document_masking"):
        pl.check_pipeline_config(docs)
    sft = types.SimpleNamespace(
        parallel=cfg.parallel, model=cfg.model, train=cfg.train, data=types.SimpleNamespace(format="prompt_completion")
    )
    with pytest.raises(UserError, match="data.format=prompt_completion .*use parallel.pp=1"):
        pl.check_pipeline_config(sft)


def test_engine_layout_errors(monkeypatch):
    from tokenmill.parallel.dist import DistInfo
    from tokenmill.parallel.engine import build_mesh

    one = DistInfo(0, 1, 0, __import__("torch").device("cpu"), None)
    with pytest.raises(UserError, match="torchrun --nproc-per-node=2"):
        build_mesh(one, 2)
    three = DistInfo(0, 3, 0, __import__("torch").device("cpu"), "gloo")
    with pytest.raises(UserError, match="parallel.pp=2 does not divide the 3 processes"):
        build_mesh(three, 2)


def test_zero1_with_pipeline_is_refused():
    import torch

    from tokenmill.model import build_meta
    from tokenmill.parallel.dist import DistInfo
    from tokenmill.parallel.engine import Engine
    from tokenmill.train.precision import Precision

    cfg = tiny_config("zero1", pp=2)
    one = DistInfo(0, 1, 0, torch.device("cpu"), None)
    with pytest.raises(UserError, match="zero1 cannot be combined with parallel.pp"):
        Engine(build_meta(cfg.model), cfg, one, Precision("fp32", one.device))

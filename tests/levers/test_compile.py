"""train.compile_scope: which layouts compile one graph, which compile per block, and the refusals."""

from __future__ import annotations

import pytest

from tokenmill.config import load_config
from tokenmill.errors import ConfigError, UserError
from tokenmill.levers.compile import COMPILE_SCOPES, NO_COMPILE, resolve_compile_scope
from tokenmill.train.config import COMPILE_SCOPE_NAMES


def test_the_config_names_are_the_scopes():
    assert set(COMPILE_SCOPES) | {"auto"} == set(COMPILE_SCOPE_NAMES)


def test_an_unknown_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile_scope"):
        load_config(["tiny"], None, ["train.compile_scope=graph"])


def test_nothing_is_compiled_without_train_compile():
    for requested in COMPILE_SCOPE_NAMES:
        assert resolve_compile_scope(False, requested, strategy="fsdp", pp=2) == NO_COMPILE


@pytest.mark.parametrize("strategy", ["single", "ddp", "zero1"])
def test_auto_compiles_one_graph_when_nothing_needs_blocks(strategy):
    assert resolve_compile_scope(True, "auto", strategy=strategy, pp=1) == COMPILE_SCOPES["model"]


@pytest.mark.parametrize(
    "layout",
    [
        {"strategy": "fsdp", "pp": 1},
        {"strategy": "single", "pp": 2},
        {"strategy": "single", "pp": 1, "activation_checkpointing": "all"},
        {"strategy": "single", "pp": 1, "fp8": "tensorwise"},
        {"strategy": "single", "pp": 1, "plain_loss": False},
    ],
)
def test_auto_compiles_blocks_when_a_wrapper_needs_them(layout):
    assert resolve_compile_scope(True, "auto", **layout) == COMPILE_SCOPES["blocks"]


def test_an_explicit_scope_is_kept():
    assert resolve_compile_scope(True, "blocks", strategy="single", pp=1) == COMPILE_SCOPES["blocks"]
    assert resolve_compile_scope(True, "model", strategy="single", pp=1, fp8="rowwise") == COMPILE_SCOPES["model"]


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ({"strategy": "fsdp", "pp": 1}, "parallel.strategy=fsdp"),
        ({"strategy": "ddp", "pp": 2}, "parallel.pp=2"),
        ({"strategy": "single", "pp": 1, "activation_checkpointing": "every_k"}, "train.activation_checkpointing"),
    ],
)
def test_one_graph_is_refused_where_blocks_are_needed(layout, named):
    with pytest.raises(UserError) as err:
        resolve_compile_scope(True, "model", **layout)
    message = str(err.value)
    assert "\n" not in message and named in message and "train.compile_scope=auto or blocks" in message

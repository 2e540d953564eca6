"""parallel/wrappers.py: the one place that knows wrapper prefixes and how to find the plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from tokenmill.parallel.wrappers import canonical_name, uncompiled, unwrap


@pytest.mark.parametrize(
    "name, plain",
    [
        ("blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.weight"),
        ("module.blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.weight"),  # DDP
        ("_orig_mod.module.tok_emb.weight", "tok_emb.weight"),  # torch.compile(DDP(model))
        ("module._orig_mod.tok_emb.weight", "tok_emb.weight"),  # DDP(torch.compile(model))
        ("blocks.3._orig_mod.ffn.w1.weight", "blocks.3.ffn.w1.weight"),  # a block compiled on its own
        ("blocks.3._checkpoint_wrapped_module.ffn.w1.weight", "blocks.3.ffn.w1.weight"),  # activation checkpointing
        ("blocks.3._fsdp_wrapped_module.norm.weight", "blocks.3.norm.weight"),  # FSDP1
        ("encoder.module.weight", "encoder.module.weight"),  # a real submodule called `module` is kept
        ("module", "module"),  # a parameter of that name is not a prefix
    ],
)
def test_canonical_name(name, plain):
    assert canonical_name(name) == plain


def test_unwrap_finds_the_plain_model_under_every_wrapper():
    model = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled here
    assert unwrap(model) is model
    assert unwrap(compiled) is model
    assert unwrap(nn.DataParallel(compiled)) is model  # DataParallel names like DDP and runs on CPU
    assert unwrap(torch.compile(nn.DataParallel(model))) is model
    assert unwrap(checkpoint_wrapper(model)) is model


def test_uncompiled_keeps_the_module_that_syncs_gradients():
    model = nn.Linear(2, 2)
    parallel = nn.DataParallel(model)
    assert uncompiled(torch.compile(parallel)) is parallel
    assert uncompiled(parallel) is parallel


def test_a_module_that_only_looks_like_a_wrapper_is_not_unwrapped():
    class HasModule(nn.Module):  # a `.module` attribute alone does not make a wrapper
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    outer = HasModule()
    assert unwrap(outer) is outer

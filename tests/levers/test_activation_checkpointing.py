"""Activation checkpointing gives the same loss and gradients as the plain model and keeps state-dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tokenmill.errors import ConfigError
from tokenmill.levers.activation_checkpointing import apply_activation_checkpointing, is_checkpointed
from tokenmill.parallel.wrappers import canonical_name


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)  # RNG inside the block: recomputation must reuse the same mask

    def forward(self, x):
        return x + self.drop(torch.tanh(self.ff(self.norm(x))))


class _Toy(nn.Module):
    def __init__(self, d: int = 16, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).square().mean()


def _loss_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    loss = model(x)
    loss.backward()
    grads = {canonical_name(n): p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "mode,every,expected", [("all", 1, [0, 1, 2, 3]), ("every_k", 2, [1, 3]), ("every_k", 3, [2]), ("none", 1, [])]
)
def test_same_loss_and_grads(mode, every, expected):
    torch.manual_seed(0)
    plain = _Toy()
    ac = apply_activation_checkpointing(copy.deepcopy(plain), mode, every)
    assert [i for i, b in enumerate(ac.blocks) if is_checkpointed(b)] == expected
    x = torch.randn(3, 5, 16, requires_grad=False)
    loss_p, grads_p = _loss_and_grads(plain, x)
    loss_a, grads_a = _loss_and_grads(ac, x)
    assert torch.equal(loss_p, loss_a)
    assert grads_p.keys() == grads_a.keys()
    for k in grads_p:
        torch.testing.assert_close(grads_a[k], grads_p[k], rtol=0, atol=0)


def test_state_dict_keys_unchanged_and_load_both_ways():
    plain = _Toy()
    ac = apply_activation_checkpointing(copy.deepcopy(plain), "all")
    assert list(ac.state_dict()) == list(plain.state_dict())
    other = apply_activation_checkpointing(_Toy(), "all")
    other.load_state_dict(plain.state_dict())  # plain -> AC
    fresh = _Toy()
    fresh.load_state_dict(ac.state_dict())  # AC -> plain
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(other.state_dict()[k], v)


def test_apply_twice_does_not_double_wrap():
    m = apply_activation_checkpointing(apply_activation_checkpointing(_Toy(), "all"), "all")
    assert not any(is_checkpointed(b._checkpoint_wrapped_module) for b in m.blocks)


def test_bad_mode():
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_activation_checkpointing(_Toy(), "some")

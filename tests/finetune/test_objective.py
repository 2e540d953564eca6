"""The GRPO objective: group advantages, the clipped surrogate, the k3 KL and PolicyLoss on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.finetune.config import RLConfig
from tokenmill.finetune.objective import (
    PolicyLoss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    token_logprobs,
    zero_std_groups,
)
from tokenmill.levers.loss import IGNORE_INDEX
from tokenmill.model.build import build_model
from tokenmill.model.config import ModelConfig


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, vocab_size=32, max_seq_len=16)
    return build_model(cfg)


def rl_batch(advantages: list[float]) -> dict[str, torch.Tensor]:
    """Two prompt tokens then three completion tokens per row."""
    rows = len(advantages)
    tokens = torch.randint(0, 32, (rows, 6), generator=torch.Generator().manual_seed(1))
    targets = tokens[:, 1:].clone()
    targets[:, :1] = IGNORE_INDEX  # the prompt's own next token is not trained
    weights = (targets != IGNORE_INDEX).float()
    return {"tokens": tokens, "targets": targets, "advantages": torch.tensor(advantages), "weights": weights}


@pytest.mark.parametrize("scale", ["group", "none"])
def test_advantages_sum_to_zero_per_group(scale):
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.9, 1.0, 0.0, 0.0, 0.5])
    adv = group_advantages(rewards, 4, scale).view(2, 4)
    assert adv.sum(dim=1).abs().max() < 1e-6
    assert adv[0, 3] > 0 > adv[0, 0]  # better than the group -> positive
    if scale == "none":
        torch.testing.assert_close(adv[0], rewards[:4] - rewards[:4].mean())
    else:
        assert adv[0].std().item() == pytest.approx(1.0, abs=1e-3)


def test_all_equal_group_has_exactly_zero_advantage():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, "group")
    assert torch.equal(adv[:4], torch.zeros(4))
    assert zero_std_groups(rewards, 4).tolist() == [True, False]


def test_all_equal_group_yields_exactly_zero_gradient():
    model = tiny_model()
    loss_fn = PolicyLoss(RLConfig())
    advantages = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3]), 4)
    loss = loss_fn(model, rl_batch(advantages.tolist()))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert any(g is not None for g in grads)


def test_clipped_surrogate_equals_a_hand_computation():
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, clipped = clipped_surrogate(torch.log(ratios), torch.zeros(5), advantages, 0.2, 0.3)
    # -min(r * A, clip(r, 0.8, 1.3) * A) for each pair
    expected = torch.tensor([-1.3, 1.5, -0.5, 0.8, -2.2])
    torch.testing.assert_close(loss, expected)
    assert clipped.tolist() == [True, False, False, True, False]


def test_policy_loss_equals_a_hand_computation_with_old_logprobs():
    model = tiny_model()
    cfg = RLConfig(epsilon=0.2, temperature=0.7)
    batch = rl_batch([1.0, -0.5])
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1]) / 0.7
        logp_all = torch.log_softmax(logits, -1)
    targets = batch["targets"]
    valid = targets != IGNORE_INDEX
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    old = logp - torch.tensor([[0.0, 0.3, -0.3, 0.05, 0.0], [0.0, 0.3, -0.3, 0.05, 0.0]])  # ratios e^0.3, e^-0.3
    batch["old_logprobs"] = old
    got = PolicyLoss(cfg)(model, batch)
    expected = 0.0
    for row in range(2):
        adv = batch["advantages"][row].item()
        for t in range(5):
            if valid[row, t]:
                r = math.exp(logp[row, t].item() - old[row, t].item())
                expected += -min(r * adv, min(max(r, 0.8), 1.2) * adv)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_first_pass_ratio_is_one_so_loss_is_minus_advantage_per_token():
    model = tiny_model()
    batch = rl_batch([2.0, -1.0])
    loss_fn = PolicyLoss(RLConfig())
    loss = loss_fn(model, batch)
    assert loss.item() == pytest.approx(-(2.0 * 4 + -1.0 * 4))
    stats = loss_fn.take()
    assert stats["tokens"].item() == 8 and stats["clipped"].item() == 0 and stats["entropy"].item() > 0
    assert loss_fn.take() == {}


def test_k3_kl_is_non_negative_and_zero_for_equal_policies():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(64, 10, generator=g), -1)
    ref = torch.log_softmax(torch.randn(64, 10, generator=g), -1)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))


def test_policy_loss_kl_is_zero_when_policy_is_the_reference_and_positive_otherwise():
    model, other = tiny_model(0), tiny_model(1)
    batch = rl_batch([1.0, -1.0])
    loss_fn = PolicyLoss(RLConfig(beta=0.1))
    with torch.no_grad():
        batch["ref_logprobs"] = token_logprobs(model, batch["tokens"], batch["targets"], 1.0)[0]
    loss_fn(model, batch)
    assert loss_fn.take()["kl"].item() == 0.0
    loss_fn(other, batch)
    assert loss_fn.take()["kl"].item() > 0.0

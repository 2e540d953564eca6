"""The GRPO objective: group-relative advantages, the clipped policy ratio, the k3 KL, and `PolicyLoss`, the
Engine's `loss_fn` for RL.

GRPO (Shao et al. 2024, arXiv:2402.03300) scores each of a prompt's `group_size` samples against the others:
advantage = reward - group mean (optionally / group std). The per-token loss is PPO's clipped surrogate
(Schulman et al. 2017, arXiv:1707.06347) with an optional asymmetric upper bound (DAPO, arXiv:2503.14476):

    ratio = exp(logp - logp_old);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * KL

KL to the frozen starting model uses Schulman's k3 estimator, exp(r) - r - 1 with r = logp_ref - logp
(http://joschu.net/blog/kl-approx.html): unbiased, and >= 0 per token. On the first pass over a rollout batch
logp_old is logp itself (detached), so the ratio is exactly 1 and the gradient is the plain policy gradient;
with `iterations_per_batch > 1` logp_old is the rollout policy's, computed once before the first update.
A loss near 0 is normal: advantages are centred (watch the reward, not the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.finetune.config import RLConfig
from tokenmill.levers.loss import IGNORE_INDEX, Batch

STD_EPS = 1e-4  # TRL's guard against dividing by a tiny group std
STAT_NAMES = ("tokens", "entropy", "clipped", "kl")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(N,) rewards in groups of `group_size` consecutive samples -> (N,) advantages.

    reward - group mean, divided by (group std + STD_EPS) when scale="group" (scale="none" is Dr. GRPO's
    unbiased form, arXiv:2503.20783). A group whose rewards are all equal gets exactly 0: it has nothing to teach.
    """
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (std + STD_EPS)
    flat = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred).view(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / group_size,) bool: groups whose samples all got the same reward."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss and where the clip decided it (both shaped like `logp`; advantages broadcast)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(r) - r - 1 with r = ref_logp - logp; >= 0."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def token_logprobs(
    model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probabilities of the targets under softmax(logits / temperature), and (B, T) entropies.

    `tokens` (B, T+1), `targets` (B, T) with IGNORE_INDEX where no token is scored (those get logp 0).
    """
    logits = model(tokens[:, :-1]).float() / temperature  # (B, T, V)
    logprobs = F.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
    valid = targets != IGNORE_INDEX
    return torch.where(valid, picked, torch.zeros_like(picked)), entropy


class PolicyLoss:
    """loss_fn(model, batch) -> the summed GRPO loss of one micro-batch (the engine divides it by the step's
    denominator). The batch holds tokens (B, T+1), targets (B, T), advantages (B,), weights (B, T) (the loss
    normalisation's per-token weight) and, when used, old_logprobs and ref_logprobs (B, T).

    It adds each micro-step's token count, entropy, clipped tokens and KL to `totals` (detached, no host sync);
    the loop reads and resets them with `take()` once per step.
    """

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        self.epsilon_high = cfg.epsilon_high or cfg.epsilon
        self.totals: dict[str, torch.Tensor] = {}

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        targets = batch["targets"]
        valid = targets != IGNORE_INDEX
        logp, entropy = token_logprobs(model, batch["tokens"], targets, self.cfg.temperature)
        old = batch["old_logprobs"] if "old_logprobs" in batch else logp.detach()
        advantages = batch["advantages"].float().unsqueeze(-1)  # (B, 1)
        per_token, clipped = clipped_surrogate(logp, old, advantages, self.cfg.epsilon, self.epsilon_high)
        kl = k3_kl(logp, batch["ref_logprobs"]) if "ref_logprobs" in batch else torch.zeros_like(logp)
        if self.cfg.beta > 0:
            per_token = per_token + self.cfg.beta * kl
        self._add(valid, entropy, clipped, kl)
        return (per_token * batch["weights"] * valid).sum()

    def _add(self, valid: torch.Tensor, entropy: torch.Tensor, clipped: torch.Tensor, kl: torch.Tensor) -> None:
        with torch.no_grad():
            values = (valid.sum(), (entropy * valid).sum(), (clipped & valid).sum(), (kl * valid).sum())
            for name, value in zip(STAT_NAMES, values, strict=True):
                value = value.detach().double()
                self.totals[name] = self.totals[name] + value if name in self.totals else value

    def take(self) -> dict[str, torch.Tensor]:
        """The sums since the last take (an empty dict when nothing ran)."""
        totals, self.totals = self.totals, {}
        return totals

"""Log-probabilities of chosen target tokens, computed the way `Transformer.loss` computes them.

Shared by source evaluation (loss over windows) and the lm-eval adapter (continuation log-likelihoods). Only the
scored positions go through the output head, so a batch never builds full (B, T, V) logits when few positions
count (multiple-choice continuations, the tail of a sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.transformer import head_logits


@torch.no_grad()
def target_logprobs(
    model: torch.nn.Module, inputs: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target == argmax) per scored token, both (n,) on the CPU, fp64 and bool.

    `inputs` (B, T) are token ids on the model's device; scored token k is `targets[k]`, predicted from the
    logits at (`rows[k]`, `positions[k]`). The model is put in eval mode for the call and restored after.
    """
    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden(inputs)  # (B, T, d)
        logits = head_logits(hidden[rows, positions], model.output_weight(), model.cfg.logit_softcap).float()  # (n, V)
    finally:
        model.train(was_training)
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)
    # -cross_entropy is log_softmax at the target, computed by the same kernel as the training loss
    logp = -F.cross_entropy(logits, target, reduction="none")
    return logp.double().cpu(), (logits.argmax(-1) == target).cpu()

"""Text sampling from a trained model (temperature, top-k, top-p), used for eval samples and `generate`."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 50, top_p: float = 1.0, stop_id: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive sampling; the window is cropped to the model's context and only last-position logits are built.

    A private `generator` keeps sampling from consuming the global RNG, so training that samples stays bitwise
    identical to training that does not.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = model.cfg.max_seq_len
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:], last_only=True)[0, -1].float()
        next_id = pick_token(logits, temperature, top_k, top_p, generator)
        if stop_id is not None and next_id == stop_id:
            break
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    model.train(was_training)
    return out


def pick_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token id from (V,) logits: greedy at temperature 0, else top-k then nucleus (top-p) filtering."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))

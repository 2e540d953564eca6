"""Held-out evaluation during training (SPEC T7): loss, perplexity and tokenizer-independent bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from tokenmill.parallel.dist import DistInfo, all_reduce


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], n_batches: int,
             decode: Callable[[list[int]], str], autocast: Callable[[], AbstractContextManager],
             device: torch.device, dist: DistInfo, *, chunk_size: int = 0,
             document_masking: bool = True) -> dict[str, float]:
    """Mean next-token loss over `n_batches` eval micro-batches, summed over ranks.

    `chunk_size` and `document_masking` should be the training run's (train.loss_chunk_size,
    train.document_masking): eval then fits in the memory training fits in, and measures the loss under the
    attention pattern the model was trained with.

    Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text, which compares models with different
    tokenizers (Gao et al. 2020, The Pile, section 4.2).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    for i, batch in zip(range(n_batches), batches):
        tokens = batch["tokens"].to(device)
        doc_ids = batch["doc_ids"].to(device) if document_masking and "doc_ids" in batch else None
        with autocast():
            loss_sum = model.loss(tokens, doc_ids, chunk_size=chunk_size, reduction="sum")
        n_bytes = sum(len(decode(row).encode("utf-8")) for row in tokens[:, 1:].tolist())
        totals += torch.tensor([loss_sum.double().item(), tokens[:, 1:].numel(), n_bytes],
                               dtype=torch.float64, device=device)
    all_reduce(totals)
    model.train(was_training)
    nats, n_tokens, n_bytes = totals.tolist()
    if n_tokens == 0:
        return {}
    loss = nats / n_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": nats / math.log(2) / max(n_bytes, 1.0),
            "tokens": int(n_tokens)}

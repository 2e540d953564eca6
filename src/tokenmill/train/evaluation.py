"""Held-out evaluation during training: loss, perplexity and tokenizer-independent bits per byte, and the
samples printed at the end of a run."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.errors import UserError
from tokenmill.levers.loss import IGNORE_INDEX, count_valid_targets, targets_of
from tokenmill.parallel.dist import DistInfo, all_reduce, any_rank

if TYPE_CHECKING:
    from tokenmill.config import Config
    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.metrics.sinks import MultiSink
    from tokenmill.parallel.engine import Engine


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int,
    decode: Callable[[list[int]], str],
    autocast: Callable[[], AbstractContextManager],
    device: torch.device,
    dist: DistInfo,
    *,
    chunk_size: int = 0,
    document_masking: bool = True,
) -> dict[str, float]:
    """Mean next-token loss over `max_batches` eval micro-batches per rank (0 = until the loader ends), summed
    over ranks. Masked targets (IGNORE_INDEX) count neither as loss nor as tokens.

    In a distributed run every rank stops at the first rank's last batch: sharded and pipelined models run
    each forward as a collective, so all ranks must evaluate the same number of batches.

    `chunk_size` and `document_masking` should be the training run's (train.loss_chunk_size,
    train.document_masking): eval then fits in the memory training fits in, and measures the loss under the
    attention pattern the model was trained with.

    Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text, which compares models with different
    tokenizers (Gao et al. 2020, The Pile, section 4.2).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    for batch in _agreed(batches if max_batches == 0 else itertools.islice(batches, max_batches), dist, device):
        tokens = batch["tokens"].to(device)
        targets = targets_of(batch)
        doc_ids = batch["doc_ids"].to(device) if document_masking and "doc_ids" in batch else None
        with autocast():
            loss_sum = model.loss(tokens, doc_ids, chunk_size=chunk_size, reduction="sum", targets=targets.to(device))
        n_bytes = sum(len(decode([t for t in row if t != IGNORE_INDEX]).encode("utf-8")) for row in targets.tolist())
        totals += torch.tensor(
            [loss_sum.double().item(), float(count_valid_targets(batch)), n_bytes], dtype=torch.float64, device=device
        )
    all_reduce(totals)
    model.train(was_training)
    nats, n_tokens, n_bytes = totals.tolist()
    if n_tokens == 0:
        return {}
    loss = nats / n_tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / math.log(2) / max(n_bytes, 1.0),
        "tokens": int(n_tokens),
    }


def _agreed(
    batches: Iterable[dict[str, torch.Tensor]], dist: DistInfo, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches while every rank still has one (one small all-reduce per batch in distributed runs)."""
    for batch in itertools.chain(batches, [None]):
        if any_rank(batch is None, device):
            return
        yield batch


def run_eval(engine: Engine, cfg: Config, tokenizer: Tokenizer) -> dict[str, float]:
    """Evaluate on the held-out split (a fresh loader each time: every eval sees the same batches)."""
    from tokenmill.data.loader import build_loader

    loader = build_loader(cfg, tokenizer, "eval", engine.dp_rank, engine.dp_size)  # finite: max_batches=0 ends
    started = time.perf_counter()
    try:
        result = evaluate(
            engine.model,
            loader,
            cfg.eval.max_batches,
            tokenizer.decode,
            engine.precision.autocast,
            engine.dist.device,
            engine.dist,
            chunk_size=cfg.train.loss_chunk_size,
            document_masking=cfg.train.document_masking,
        )
    finally:
        loader.close()
    if result:
        result["seconds"] = time.perf_counter() - started
    return result


def check_eval_split(cfg: Config, tokenizer: Tokenizer, rank: int, world_size: int) -> str | None:
    """Why this rank cannot evaluate (the data's own one-line reason), or None when its eval split has a batch.

    Run at set-up, so a run without an eval split (data.eval_fraction=0, or a small source whose documents all
    hash into the train split) skips evaluation from the start instead of failing after its last step.
    """
    from tokenmill.data.loader import build_loader

    try:
        loader = build_loader(cfg, tokenizer, "eval", rank, world_size)
    except UserError as err:
        return str(err)
    try:
        next(iter(loader))
    except UserError as err:
        return str(err)
    except StopIteration:
        return "the eval split holds no batch"
    finally:
        loader.close()
    return None


def write_samples(
    model: torch.nn.Module | None, cfg: Config, tokenizer: Tokenizer, dist: DistInfo, sinks: MultiSink, step: int
) -> dict[str, str]:
    """Generate from the fixed prompts with a private RNG (training randomness is untouched); rank 0 only."""
    from tokenmill.generation.engine import Generator
    from tokenmill.generation.params import SamplingParams

    if not dist.is_main or model is None:
        return {}
    prompts = list(cfg.eval.sample_prompts) if cfg.eval.sample_tokens > 0 else []
    if not prompts:
        return {}
    # token healing: the default prompts end in a space, which a BPE model has rarely seen before a word
    params = SamplingParams(
        max_new_tokens=cfg.eval.sample_tokens, temperature=0.8, top_k=50, seed=cfg.train.seed, heal_prompt=True
    )
    completions = Generator(model, tokenizer).generate(prompts, params)
    samples: dict[str, Any] = {prompts[c.prompt_index]: prompts[c.prompt_index] + c.text for c in completions}
    sinks.log(step, {"samples": samples}, kind="sample")
    return samples

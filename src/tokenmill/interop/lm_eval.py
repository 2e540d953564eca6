"""lm-evaluation-harness adapter: a tokenmill model as an lm-eval `LM`, registered under the name "tokenmill".

A native adapter, not a Hugging Face conversion: log-likelihoods come from the model's own hidden states and
output head, generation from tokenmill's KV-cache engine (generation/engine.py). It subclasses lm-eval's
`TemplateLM`, which supplies the request plumbing that is easy to get wrong (lm_eval/api/model.py): context
and continuation are tokenised together and split where the context ends, trailing context spaces move into the
continuation, and an empty context is replaced by `prefix_token_id`.

Conventions it fixes for tokenmill models:
- the end-of-text and prefix token is the tokenizer's EOS, the token the model saw before every training
  document (documents are EOS-joined), never an untrained BOS;
- text is encoded without special tokens, as in training;
- the continuation's last token is scored but never fed (the off-by-one of lm-eval#942): a (context +
  continuation) window of n tokens runs n-1 inputs, and continuation token j is read from the logits of the
  position before it.

This module imports lm_eval at import time (the class must subclass TemplateLM), so import it only when
evaluating: `tokenmill.eval.tasks` does, and turns a missing package into a one-line error naming the extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from tokenmill.errors import UserError

DEFAULT_AUTO_BATCH = 32  # batch size for batch_size="auto" without max_batch_size: lm-eval's probing is not used

Request = tuple[tuple[str | None, str | None], list[int], list[int]]


def parse_batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """An int from lm-eval's batch_size argument: a number, "auto" or "auto:N" (both give max_batch_size or
    DEFAULT_AUTO_BATCH, since sequences here are short and memory is not probed)."""
    if batch_size is None:
        return 1
    text = str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or DEFAULT_AUTO_BATCH)
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"batch_size={batch_size!r} is not a number or 'auto'") from None
    if value < 1:
        raise UserError(f"batch_size={value} must be at least 1")
    return value


@register_model("tokenmill")
class TokenmillLM(TemplateLM):
    """A tokenmill Transformer and Tokenizer behind lm-eval's LM interface.

    Pass `model` and `tokenizer` objects, or `checkpoint` (a checkpoint or run folder), e.g.
    `--model tokenmill --model_args checkpoint=runs/demo`. `batch_size`, `max_batch_size` and `device` are the
    arguments lm-eval always passes to a model's constructor. `autocast` is a context-manager factory wrapped
    around every forward pass (bf16 on a GPU).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        checkpoint: str | Path | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        super().__init__()
        if checkpoint is not None:
            from tokenmill.interop.loading import load_checkpoint

            loaded = load_checkpoint(checkpoint, device=device or "cpu")
            model, tokenizer = loaded.model, loaded.tokenizer
        if model is None or tokenizer is None:
            raise UserError("the tokenmill lm-eval model needs checkpoint=PATH, or both model and tokenizer")
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length or model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._autocast = autocast or contextlib.nullcontext
        self.seed = int(seed)  # of sampled generation: each request draws from its own seeded generator

    # -- tokens -----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids without special tokens, whatever `add_special_tokens` says (tokenmill never adds them)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # -- log-likelihood ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request,
        in the order given; scored longest first in batches (less padding), the window left-truncated to
        max_length + 1 tokens."""
        windows = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in requests]
        scored = [min(len(cont), len(window) - 1) for (_, _, cont), window in zip(requests, windows, strict=True)]
        order = sorted(range(len(requests)), key=lambda i: -len(windows[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="tokenmill loglikelihood", disable=disable_tqdm or len(starts) < 2):
            batch = order[start : start + self.batch_size]
            for i, result in zip(
                batch, self._score([windows[i] for i in batch], [scored[i] for i in batch]), strict=True
            ):
                results[i] = result
        return results

    def _score(self, windows: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
        """Score the last n_scored[i] tokens of each window (right-padded with EOS: padding after a row's end
        cannot change its causal logits)."""
        from tokenmill.eval.scoring import target_logprobs

        width = max(len(w) for w in windows) - 1
        inputs = torch.full((len(windows), width), self.eot_token_id, dtype=torch.long)
        rows, positions, targets = [], [], []
        for r, (window, n) in enumerate(zip(windows, n_scored, strict=True)):
            inputs[r, : len(window) - 1] = torch.tensor(window[:-1])
            rows += [r] * n
            positions += range(len(window) - 1 - n, len(window) - 1)
            targets += window[len(window) - n :]
        if not targets:  # only empty continuations: nothing to run
            return [(0.0, True)] * len(windows)
        with self._autocast():
            logp, greedy = target_logprobs(self.model, inputs.to(self._device), rows, positions, targets)
        results, offset = [], 0
        for n in n_scored:
            results.append((float(logp[offset : offset + n].sum()), bool(greedy[offset : offset + n].all())))
            offset += n
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: disjoint windows of max_length tokens, the first conditioned on
        the prefix token, each later one on the tokens before it (lm_eval.utils.get_rolling_token_windows)."""
        pieces: list[Request] = []
        owner: list[int] = []
        for doc, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1),
            ):
                pieces.append(((None, None), ctx, cont))
                owner.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logp, _) in zip(owner, self._loglikelihood_tokens(pieces, disable_tqdm=disable_tqdm), strict=True):
            totals[doc] += logp
        return totals

    # -- generation ----------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations from tokenmill's KV-cache engine: greedy unless the task asks for sampling, cut before
        the first stop string (the task's `until` plus the EOS text, as lm-eval's own backends stop); the prompt
        keeps its last max_length - max_gen_toks tokens. Requests with equal settings run as one batch."""
        from tokenmill.generation.engine import Generator, SamplingParams

        eos_text = self.tok_decode([self.eot_token_id])
        groups: dict[SamplingParams, list[tuple[int, list[int]]]] = {}
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            budget = max(1, min(int(kwargs["max_gen_toks"]), self.max_length - 1))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            stop = tuple(handle_stop_sequences(kwargs.get("until"), eos_text))
            params = SamplingParams(max_new_tokens=budget, temperature=temperature, stop=stop, seed=self.seed)
            groups.setdefault(params, []).append((index, self.tok_encode(context)[-(self.max_length - budget) :]))
        generator = Generator(self.model, self.tokenizer, max_batch_size=self.batch_size)
        out = [""] * len(requests)
        with self._autocast(), tqdm(total=len(requests), desc="tokenmill generate_until", disable=disable_tqdm) as bar:
            for params, items in groups.items():
                completions = generator.generate([prompt for _, prompt in items], params)
                for (index, _), completion in zip(items, completions, strict=True):
                    out[index] = completion.text
                bar.update(len(items))
        return out

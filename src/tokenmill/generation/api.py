"""`tokenmill.generate`: completions from a saved run, a checkpoint or a model in memory, in one call.

import tokenmill
completions = tokenmill.generate("runs/demo", ["def ", "import "], max_new_tokens=40, seed=0)
print(completions[0].text)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError
from tokenmill.generation.params import Completion, SamplingParams


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sampling_params(**settings: Any) -> SamplingParams:
    """SamplingParams from keyword settings; an unknown name is a UserError listing the known ones."""
    known = [f.name for f in dataclasses.fields(SamplingParams)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(f"unknown sampling setting {unknown[0]!r}: choose from {', '.join(known)}")
    return SamplingParams(**settings)


def generate(
    source: str | Path | Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer: Any = None,
    which: str = "latest",
    device: str | None = None,
    max_batch_size: int = 8,
    **settings: Any,
) -> list[Completion]:
    """Completions of `prompts` (one text, texts, or token-id lists), ordered by prompt then sample.

    `source` is a run folder or checkpoint folder (its model and tokenizer are loaded; `which` picks the
    latest or best checkpoint of a run), or a Transformer together with `tokenizer`. `settings` are
    SamplingParams fields: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed,
    n, logprobs, heal_prompt (token healing, off unless asked for).
    """
    from tokenmill.api import load_model, load_tokenizer
    from tokenmill.generation.engine import Generator

    params = sampling_params(**settings)
    loaded = isinstance(source, (str, Path))  # a model loaded here is the generator's alone
    if loaded:
        model = load_model(source, device=device or default_device(), which=which)
        tokenizer = tokenizer or load_tokenizer(source, which)
    elif tokenizer is None:
        raise UserError("generate(model, ...) needs tokenizer=...: a model in memory does not know its tokenizer")
    else:
        model = source
    if isinstance(prompts, str):
        prompts = [prompts]
    generator = Generator(model, tokenizer, device=device, max_batch_size=max_batch_size, exclusive=loaded)
    return generator.generate(prompts, params)

"""What `data.format=prompt_completion` (supervised fine-tuning) decides for the rest of a training run.

- Document masking is on: every packed example attends only to itself and starts at position 0, as a prompt
  does when `generate` or `serve` answer it (data/sft.py).
- The tokenizer is the fine-tuned model's: with `data.tokenizer=bpe` (the default, which would train a new one
  on the SFT rows) and `train.init_from`, the checkpoint's own tokenizer is used; without `train.init_from`
  SFT needs an explicit tokenizer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tokenmill.data.formats import SFT
from tokenmill.errors import ConfigError


def resolve_sft_config(cfg: Any) -> Any:
    """`cfg` with the SFT rules above applied; unchanged for pretraining (data.format=text)."""
    if cfg.data.format != SFT:
        return cfg
    data = cfg.data
    if data.tokenizer == "bpe":
        data = replace(data, tokenizer=_init_from_tokenizer(cfg.train.init_from))
    return replace(cfg, data=data, train=replace(cfg.train, document_masking=True))


def _init_from_tokenizer(init_from: str) -> str:
    """The tokenizer of the checkpoint SFT starts from: its tokenizer.json, or 'byte' when it has none."""
    if not init_from:
        raise ConfigError(
            "data.format=prompt_completion with data.tokenizer=bpe would train a new tokenizer on the SFT rows: "
            "set train.init_from=CHECKPOINT (its tokenizer is used), or data.tokenizer=byte or a tokenizer.json"
        )
    from tokenmill.checkpoint.find import find_checkpoint
    from tokenmill.checkpoint.folder import TOKENIZER

    folder = find_checkpoint(init_from)
    return str(folder / TOKENIZER) if (folder / TOKENIZER).is_file() else "byte"

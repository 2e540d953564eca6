"""`data.format`: how the training and eval loaders open their sources and pack them.

| format            | a document is              | packer                  | a batch holds                     |
| ----------------- | -------------------------- | ----------------------- | --------------------------------- |
| text              | a text field's value       | packing.Packer          | tokens, doc_ids (EOS-delimited)   |
| prompt_completion | one SFT example (rows of   | sft.SftPacker (whole    | tokens, targets (-100 on prompts  |
|                   | prompt/completion/messages)| examples, padded)       | and padding), doc_ids per example |

Everything around them (mixture, shuffling, hold-out, exact resume, eval set) is shared.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tokenmill.data.chat_template import ChatRenderer, resolve_template_text
from tokenmill.data.mixture import SourceSpec
from tokenmill.data.packing import Packer
from tokenmill.data.sft import SftPacker
from tokenmill.data.sft_source import open_sft_source
from tokenmill.data.sources import Source, open_source
from tokenmill.data.tokenizer import Tokenizer

SFT = "prompt_completion"


def chat_template_text(data: Any) -> str | None:
    """The chat template a run records: data.chat_template's text in SFT mode, None for pretraining or 'none'."""
    if data.format != SFT:
        return None
    return resolve_template_text(data.chat_template)


def open_sources(data: Any, tokenizer: Tokenizer, specs: list[SourceSpec]) -> list[Source]:
    """The sources of `specs` as `data.format` reads them; SFT rows are all checked here (sft_source.py)."""
    if data.format != SFT:
        skip_generated = data.stdlib_skip_generated
        return [open_source(s.location, data.text_field, data.stream_local_files, skip_generated) for s in specs]
    text = chat_template_text(data)
    renderer = None if text is None else ChatRenderer(text, f"data.chat_template={data.chat_template}", tokenizer)
    return [open_sft_source(s.location, renderer) for s in specs]


def build_packer(data_format: str, tokenizer: Tokenizer, window: int, bos_aligned: bool = False) -> Packer | SftPacker:
    """The packer of `data_format` for windows of `window` tokens (bos_aligned: text eval windows only)."""
    if data_format == SFT:
        return SftPacker(tokenizer, window)
    return Packer(tokenizer, window, bos_aligned=bos_aligned)


def format_identity(data: Any) -> dict[str, Any]:
    """What a loader state must match beyond the text sources: nothing for text (old states resume unchanged),
    the format and the template's hash for SFT (another template renders other examples)."""
    if data.format != SFT:
        return {}
    text = chat_template_text(data) or ""
    return {"format": data.format, "chat_template": hashlib.sha256(text.encode()).hexdigest()[:16]}

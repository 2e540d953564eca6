"""Chat prompts: the chat template a checkpoint records, rendered and tokenized the way Hugging Face does it.

Where the template comes from (first found wins), so a fine-tuning run only has to write the Hugging Face files:
1. `chat_template.jinja` in the checkpoint folder, then in the folder of the tokenizer.json it was trained with;
2. the `chat_template` key of `tokenizer_config.json` in those folders (a string, or a list of named templates
   from which "default" is taken).
`tokenizer_config.json` may also name the `eos_token` that ends an assistant turn; when it is not the
tokenizer's end-of-document token it becomes a stop sequence of every chat request. A checkpoint without a
template is a base model, and /v1/chat/completions answers 400 for it.

Rendering follows transformers' `apply_chat_template` (src/transformers/utils/chat_template_utils.py): a
sandboxed Jinja environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, and the variables
`messages`, `add_generation_prompt=True`, `bos_token`, `eos_token`. The rendered text is tokenized with the
special-token strings it contains mapped to their ids, as a Hugging Face tokenizer does. Nothing here needs the
server's packages, so `tokenmill generate --chat` uses the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.data.chat_template import compile_template, encode_with_specials, special_token_ids
from tokenmill.errors import UserError

if TYPE_CHECKING:
    from tokenmill.data.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    text: str
    origin: str  # the file it was read from, for messages
    bos_token: str
    eos_token: str  # the token that ends an assistant turn
    template: Any  # jinja2.Template

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages`, ending where the assistant's answer starts."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except TemplateError as err:  # includes raise_exception() from the template itself
            raise UserError(f"the chat template refused these messages: {err}") from None


def find_chat_template(checkpoint: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template recorded for this checkpoint, or None for a base model."""
    folders = [checkpoint]
    if tokenizer.backend is not None and Path(tokenizer.name).is_file():
        folders.append(Path(tokenizer.name).parent)
    for folder in folders:
        config = _tokenizer_config(folder / TOKENIZER_CONFIG)
        text, origin = None, None
        if (folder / TEMPLATE_FILE).is_file():
            text, origin = (folder / TEMPLATE_FILE).read_text(encoding="utf-8"), folder / TEMPLATE_FILE
        elif config.get("chat_template"):
            text, origin = _named_default(config["chat_template"], folder / TOKENIZER_CONFIG), folder / TOKENIZER_CONFIG
        if text is not None:
            eos = _token_text(config.get("eos_token")) or tokenizer.decode([tokenizer.eos_id])
            bos = _token_text(config.get("bos_token")) or tokenizer.decode([tokenizer.bos_id])
            return ChatTemplate(text, str(origin), bos, eos, compile_template(text, f"in {origin}"))
    return None


def end_of_turn_stops(template: ChatTemplate, tokenizer: Tokenizer) -> tuple[str, ...]:
    """Stop sequences that end an assistant turn, beyond the end-of-document token the engine stops on."""
    return () if template.eos_token == tokenizer.decode([tokenizer.eos_id]) else (template.eos_token,)


def encode_chat_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat prompt, special-token strings (e.g. <|eos|>, <|im_start|>) as their own ids,
    exactly as a fine-tuning run tokenized the prompts it trained on (tokenmill.data.chat_template)."""
    return encode_with_specials(tokenizer, text, special_token_ids(tokenizer))


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _named_default(value: Any, path: Path) -> str:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the chat one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"chat_template in {path} must be a string or a list holding a template named 'default'")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None

"""Chat templates for supervised fine-tuning: which template a run uses, and a conversation rendered into the
pieces that are context (masked) and the pieces the model learns (the assistant turns).

A template is a Jinja string in Hugging Face's format (`messages`, `add_generation_prompt`, `bos_token`,
`eos_token`), compiled in a sandbox as transformers' `apply_chat_template` does
(src/transformers/utils/chat_template_utils.py). The run records the template text in every checkpoint as
`chat_template.jinja`, which is where `serve` and `export` look for it.

Which assistant text is learned: for assistant turn i, the prompt is the rendering of messages[:i] with the
generation prompt, exactly what a server feeds the model before it answers; the learned text is what the
rendering of messages[:i + 1] adds after it. So training sees the same token boundaries as generation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.errors import UserError

if TYPE_CHECKING:
    from tokenmill.data.tokenizer import Tokenizer

NO_TEMPLATE = "none"
DEFAULT_TEMPLATE_NAME = "default"

# Plain-text turns; an assistant turn ends with the end-of-document token, so generation stops on its own.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

BUILT_IN = {DEFAULT_TEMPLATE_NAME: DEFAULT_TEMPLATE}


def resolve_template_text(setting: str) -> str | None:
    """The template text `data.chat_template` names: a built-in name, a .jinja file, or None for 'none'."""
    if setting == NO_TEMPLATE:
        return None
    if setting in BUILT_IN:
        return BUILT_IN[setting]
    path = Path(setting).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.chat_template={setting!r}: no such file; give a .jinja file, "
            f"{' or '.join(sorted(BUILT_IN))} (built in), or {NO_TEMPLATE}"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template={setting!r}: cannot read it ({err})") from None


def compile_template(text: str, origin: str) -> Any:
    """A sandboxed jinja2 Template with the globals and filters Hugging Face chat templates use."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except TemplateError as err:
        raise UserError(f"the chat template {origin} is not valid Jinja: {err}") from None


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """String -> id of every special token of the tokenizer."""
    if tokenizer.backend is None:
        ids = [tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id]
        return {tokenizer.decode([i]): i for i in ids if i is not None}
    return {
        token.content: index for index, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special
    }


def split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """`text` as plain-text pieces and special-token ids (e.g. "<|eos|>" -> its id), in order."""
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [specials.get(piece, piece) for piece in re.split(pattern, text) if piece]


def encode_with_specials(tokenizer: Tokenizer, text: str, specials: dict[str, int]) -> list[int]:
    """Token ids of rendered template text, each special-token string (e.g. <|eos|>) as its own id.

    `Tokenizer.encode` treats such strings as plain text, which is right for documents and wrong for a
    template that spells out its turn markers.
    """
    ids: list[int] = []
    for piece in split_specials(text, specials):
        ids.extend([piece] if isinstance(piece, int) else tokenizer.encode(piece))
    return ids


@dataclass
class Segment:
    """A stretch of an example's text: learned (the loss is taken on its tokens) or context only."""

    text: str
    learned: bool


class ChatRenderer:
    """Renders `messages` rows with one template into learned and context segments (see the module docstring)."""

    def __init__(self, text: str, origin: str, tokenizer: Tokenizer) -> None:
        self.text, self.origin = text, origin
        self.template = compile_template(text, origin)
        self.bos_token = tokenizer.decode([tokenizer.bos_id])
        self.eos_token = tokenizer.decode([tokenizer.eos_id])

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except TemplateError as err:  # includes raise_exception() from the template itself
            raise ValueError(f"the chat template {self.origin} failed to render it ({err})") from None

    def segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        """Context and learned segments whose concatenation is the rendering of the whole conversation.

        Raises ValueError (with the reason) when the template does not render the conversation as a sequence of
        growing prefixes, which makes the assistant turns impossible to cut out.
        """
        segments: list[Segment] = []
        done = ""  # text covered by the segments so far
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    f"the chat template {self.origin} does not render turn {i + 1} as a continuation of the "
                    f"earlier turns, so its assistant text cannot be cut out"
                )
            if len(prompt) > len(done):
                segments.append(Segment(prompt[len(done) :], learned=False))
            if len(full) > len(prompt):
                segments.append(Segment(full[len(prompt) :], learned=True))
            done = full
        rest = self.render(messages, add_generation_prompt=False)
        if rest.startswith(done) and len(rest) > len(done):
            segments.append(Segment(rest[len(done) :], learned=False))
        return segments

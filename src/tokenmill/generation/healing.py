"""Token healing: the model, not the tokenizer, decides how the last word of a prompt is split.

A byte-level BPE puts a word's leading space into the word's token (" foo"), so a prompt that ends in a space
ends in a bare " " token, which training text almost never follows with a word: the first sampled tokens are
off-distribution. Token healing backs up one token: the prompt's last token is removed, the shorter prompt is
prefilled, and the first generated token must be one whose text starts with the removed text (" foo", " bar", or
" " itself), so the model picks the split it was trained on. This is guidance's token healing
(https://github.com/guidance-ai/guidance) and Hugging Face transformers' `generate(token_healing=True)`
(https://github.com/huggingface/transformers/pull/30081).

A prompt is left as it is when it has a single token, when its last token is a special token, decodes to nothing
or to an incomplete UTF-8 character on its own, or when no other token's text extends the last token's text. So
is every prompt when the tokenizer's text is not the concatenation of its tokens' texts (SentencePiece's Metaspace
decoder drops the space of a text's first token, so " foo" alone reads "foo"): a token's own text is all the
index and the completion's text can go by.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from tokenmill.generation.text import REPLACEMENT

# code and prose with the spaces, indents and newlines a prompt ends in; ASCII, so every token decodes alone
PROBE = "def f(x):\n    return x + 1  # see the docs\n\nThe end. "


@dataclass(frozen=True)
class Healing:
    """How one prompt is healed: what is prefilled, the text taken off its end, and the first token's choices."""

    prompt_ids: list[int]  # the prompt without its last token
    removed_text: str  # the removed token's text; the first generated token starts with it
    allowed_ids: list[int]  # every token whose text starts with removed_text, the removed token included


def special_ids(tokenizer: Any) -> set[int]:
    """Ids that stand for no text (EOS, BOS, padding, other special tokens): never a healed first token."""
    ids = {getattr(tokenizer, name, None) for name in ("eos_id", "bos_id", "pad_id")}
    if hasattr(tokenizer, "token_bytes"):  # 0 bytes marks a special token
        ids.update(i for i, n in enumerate(tokenizer.token_bytes()) if n == 0)
    return {i for i in ids if i is not None}


def decodes_token_by_token(tokenizer: Any) -> bool:
    """Whether a text decodes to its tokens' own texts, joined (true of byte-level BPE and the byte tokenizer)."""
    ids = tokenizer.encode(PROBE)
    return tokenizer.decode(ids) == "".join(tokenizer.decode([i]) for i in ids)


class PrefixIndex:
    """The decoded text of every ordinary token, sorted, so the tokens whose text starts with a string are one
    contiguous slice found by two binary searches (O(log V) per prompt; building it decodes each token once)."""

    def __init__(self, tokenizer: Any, vocab_limit: int) -> None:
        """`vocab_limit`: ids at and above it are never sampled, so they are left out."""
        specials = special_ids(tokenizer)
        ids = [i for i in range(vocab_limit) if i not in specials] if decodes_token_by_token(tokenizer) else []
        texts = [tokenizer.decode([i]) for i in ids]
        self.text_of = dict(zip(ids, texts, strict=True))
        pairs = sorted(zip(texts, ids, strict=True))
        self.texts = [text for text, _ in pairs]
        self.ids = [i for _, i in pairs]

    def extensions(self, prefix: str) -> list[int]:
        """Ids of every token whose text starts with `prefix` (those equal to it included)."""
        start = bisect_left(self.texts, prefix)
        # cutting sorted strings to len(prefix) characters keeps them sorted, so the matches end where the cut
        # texts pass `prefix`
        end = bisect_right(self.texts, prefix, lo=start, key=lambda text: text[: len(prefix)])
        return self.ids[start:end]

    def heal(self, prompt_ids: list[int]) -> Healing | None:
        """The healing of a prompt, or None when it is left as it is (see the module docstring)."""
        if len(prompt_ids) < 2:
            return None
        removed = self.text_of.get(prompt_ids[-1])
        if not removed or REPLACEMENT in removed:
            return None
        allowed = self.extensions(removed)
        if all(len(self.text_of[i]) == len(removed) for i in allowed):
            return None
        return Healing(prompt_ids[:-1], removed, allowed)

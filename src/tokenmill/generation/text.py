"""Token ids -> text for one sample, as it is generated: UTF-8 safe deltas and stop strings with hold-back.

Decoding each token alone breaks characters that span tokens (a byte tokenizer emits "é" as two tokens;
byte-level BPE splits emoji), and decoding the whole output every step costs O(n^2). The incremental rule of
vLLM's `detokenize_incrementally` does neither: decode a short window of recent tokens and emit the text it
adds only when that text does not end in U+FFFD (an incomplete character).

Stop strings are matched on the decoded text, not on token ids, so every tokenisation of a stop string is
caught (litgpt matches token sequences and can miss them). Text that could still become a stop string is held
back until it cannot (litgpt's `stop_progress` idea), so a stream never shows part of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Text of one sample: `add(token)` returns the text now safe to show; `stopped` turns True when a stop
    string appears (the text then ends just before it); `flush()` returns what was held back at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), shown: str = "") -> None:
        """`shown`: text the tokens begin with that the reader already has (the prompt's end under token
        healing); it is neither returned nor matched against stop strings."""
        self.decode = decode
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode window start: text before it is final
        self.read_offset = 0  # tokens up to here are in `decoded`
        self.decoded = ""  # text of every token up to read_offset (complete characters only)
        self.skip = len(shown)
        self.emitted = self.skip  # characters of `decoded` already returned (or shown before)
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self.decoded[self.skip : self.emitted]

    def add(self, token_id: int) -> str:
        """Take one generated token; return the new text that can be shown ('' while a character is incomplete
        or the tail might start a stop string)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.decoded += new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """No more tokens: return the held-back text and any incomplete character (as U+FFFD)."""
        if self.stopped:
            return ""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        self.decoded += self.decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
        self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        """Emit decoded text up to the first stop string, holding back a tail that may begin one."""
        end = len(self.decoded)
        if self.stop:
            # a stop string cannot start before `emitted`: its beginning would have been held back
            hits = [i for i in (self.decoded.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held_back()
        out = self.decoded[self.emitted : end]
        self.emitted = max(self.emitted, end)
        if self.stopped:
            self.decoded = self.decoded[:end]
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `decoded` that is a proper prefix of some stop string."""
        for k in range(min(self.longest_stop - 1, len(self.decoded) - self.emitted), 0, -1):
            tail = self.decoded[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

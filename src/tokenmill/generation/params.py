"""What a generation request asks for (`SamplingParams`) and what it gets back (`Completion`, `StreamDelta`).

Plain dataclasses without torch, so the CLI and a server can build and validate requests cheaply. Invalid
settings raise a UserError naming the field and its allowed range when the object is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import UserError

FINISH_REASONS = ("stop", "length")  # stop: EOS or a stop string; length: token budget or model.max_seq_len


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise UserError(f"{name}={value!r} is not allowed: {rule}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request; the defaults are plain sampling from the model's distribution.

    Filters apply in this order (as Hugging Face `generate` does): repetition penalty, temperature, top-k,
    top-p, min-p. temperature=0 is greedy decoding (the penalty still applies; the other filters do not).

    heal_prompt (token healing, generation/healing.py): the prompt's last token is removed when other tokens'
    texts extend its text, and the first generated token must start with that text, so a prompt ending in a
    space ("def ") continues with a word token (" foo") as in training instead of after a bare " " token. The
    completion's text leaves out the removed text (prompt + text reads as the prompt followed by new text); its
    first token id includes it and counts towards max_new_tokens. Off here and in the server, on in
    `tokenmill generate` and in training samples.
    """

    max_new_tokens: int = 64  # tokens to generate at most (also capped by the model's context)
    temperature: float = 1.0  # logits are divided by it; 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (nucleus sampling)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (arXiv:2407.01082)
    repetition_penalty: float = 1.0  # CTRL penalty (arXiv:1909.05858) on tokens already in prompt or output
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated
    seed: int | None = None  # same seed, same prompt, same settings -> same text; None = fresh randomness
    n: int = 1  # samples per prompt; they share one prefill and are sampled independently from the first token
    logprobs: bool = False  # return the log-probability of each sampled token
    heal_prompt: bool = False  # token healing: let the first token re-split the prompt's last token (see above)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "give an integer >= 1",
        )
        _require(self.temperature >= 0, "temperature", self.temperature, "give a number >= 0 (0 = greedy)")
        _require(
            isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "give an integer >= 0 (0 = no top-k)"
        )
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "give a number in (0, 1] (1 = no top-p)")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "give a number in [0, 1] (0 = no min-p)")
        _require(
            self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "give a number > 0 (1 = no penalty)",
        )
        _require(isinstance(self.n, int) and self.n >= 1, "n", self.n, "give an integer >= 1")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "give non-empty strings")
        _require(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "give an integer or None")
        _require(isinstance(self.heal_prompt, bool), "heal_prompt", self.heal_prompt, "give True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One finished sample.

    token_ids holds every sampled token, including the EOS or the tokens that completed a stop string (what
    the model produced, for RL); text is their decoded text without EOS and cut before the stop string. With
    heal_prompt, the first token's text begins with the text removed from the prompt, which `text` leaves out.
    logprobs (when asked for) are per token of token_ids, under the model's own distribution (the raw logits,
    before temperature, penalty and filters), as OpenAI's and vLLM's APIs report them.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None


@dataclass
class StreamDelta:
    """What one sample produced since its previous delta: new text (UTF-8 complete, never part of a stop
    string), new token ids, and finish_reason on the sample's last delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    sample_index: int = 0
    logprobs: list[float] | None = field(default=None)

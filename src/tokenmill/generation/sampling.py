"""Next-token choice for a batch of rows, each with its own settings and its own `torch.Generator`.

Every operation is row-wise, so a row's tokens do not depend on which other rows share its batch: a request
gives the same text alone or batched with others. A row samples by the exponential race
argmax(p_i / E_i), E_i ~ Exp(1) drawn from the row's generator, which picks token i with probability p_i
(the Gumbel-max trick in another form; gpt-fast samples this way) without a CPU round trip per row.
Filters run only when some row asks for them.
"""

from __future__ import annotations

import torch

from tokenmill.generation.params import SamplingParams


class BatchSampler:
    """Chooses one token per row from (n, V) logits; rows are given in the order of the logits."""

    def __init__(
        self, params: list[SamplingParams], generators: list[torch.Generator], vocab_limit: int, device: torch.device
    ) -> None:
        """`vocab_limit`: ids >= it are never chosen (embedding rows past the tokenizer's vocabulary)."""
        self.vocab_limit = vocab_limit
        self.generators = generators
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]  # rows that draw random tokens
        self.any_greedy = len(self.sampled) < len(params)
        self.want_logprobs = any(p.logprobs for p in params)

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)[:, None]  # (n, 1)

        self.penalty = (
            column([p.repetition_penalty for p in params]) if any(p.repetition_penalty != 1.0 for p in params) else None
        )
        sampled = [params[i] for i in self.sampled]
        self.greedy_rows = column([float(p.greedy) for p in params], torch.bool)
        self.temperature = column([p.temperature or 1.0 for p in sampled])
        self.top_k = column([p.top_k for p in sampled], torch.long) if any(p.top_k for p in sampled) else None
        self.top_p = column([p.top_p for p in sampled]) if any(p.top_p < 1 for p in sampled) else None
        self.min_p = column([p.min_p for p in sampled]) if any(p.min_p > 0 for p in sampled) else None
        self.sampled_index = torch.tensor(self.sampled, dtype=torch.long, device=device)

    def __call__(
        self, logits: torch.Tensor, seen: torch.Tensor | None, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, V) logits, (n, V) bool tokens-seen (for the repetition penalty), (n, V) bool tokens each row may
        choose (None = any) -> (n,) ids, (n,) logprobs or None."""
        logits = logits.float()
        logprobs = logits.log_softmax(dim=-1) if self.want_logprobs else None
        if self.vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_limit :] = float("-inf")
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.penalty is not None and seen is not None:
            # CTRL (arXiv:1909.05858) as Hugging Face applies it: divide positive logits, multiply negative ones
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalised, logits)
        if not self.sampled:
            tokens = logits.argmax(dim=-1)
        elif not self.any_greedy:
            tokens = self._sample(logits)  # every row samples: no greedy argmax, no gather of the sampling rows
        else:
            drawn = self._sample(logits[self.sampled_index])
            tokens = logits.argmax(dim=-1).index_copy(0, self.sampled_index, drawn)
        chosen = None if logprobs is None else logprobs.gather(1, tokens[:, None])[:, 0]
        return tokens, chosen

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(m, V) logits of the sampling rows -> (m,) ids: temperature, top-k, top-p, min-p, exponential race."""
        logits = logits / self.temperature
        if self.top_k is not None:
            k = self.top_k.clamp(max=logits.shape[-1])
            top = logits.topk(int(k.max()), dim=-1).values  # (m, kmax), sorted descending
            kth = top.gather(1, (k - 1).clamp(min=0))
            logits = logits.masked_fill((k > 0) & (logits < kth), float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p is not None:
            # nucleus (Holtzman et al. 2019, arXiv:1904.09751): keep the most likely tokens while the probability
            # before them is below top_p, so the token that crosses the threshold is kept
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.masked_fill(drop.scatter(1, order, drop), 0.0)
        if self.min_p is not None:
            probs = probs.masked_fill(probs < self.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        if len(self.sampled) == 1:  # the same draws as the stack below, without it
            noise = torch.empty_like(probs).exponential_(generator=self.generators[self.sampled[0]])
        else:
            noise = torch.stack(
                [torch.empty_like(probs[0]).exponential_(generator=self.generators[i]) for i in self.sampled]
            )  # (m, V), each row from its own generator
        return probs.div_(noise).argmax(dim=-1)  # probs is this call's own tensor

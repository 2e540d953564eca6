"""Tiny models and test doubles shared by the generation tests."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.data.tokenizer import Tokenizer
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig
from tokenmill.model.transformer import Transformer

BYTE = Tokenizer.byte()
V = 320  # the byte tokenizer's 259 ids rounded up to 64: ids 259..319 are never chosen


def tiny_cfg(**overrides) -> ModelConfig:
    base = {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": V,
        "max_seq_len": 48,
        "ffn_hidden": 48,
    }
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides)).eval()


def reference_greedy(
    model: Transformer, prompt: list[int], max_new_tokens: int, vocab_limit: int, eos_id: int
) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the plain forward for every token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens and len(ids) < model.cfg.max_seq_len:
            logits = model(torch.tensor([ids]))[0, -1, :vocab_limit]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out


class ScriptedModel(nn.Module):
    """A stand-in model that emits `script` token by token (one-hot logits), whatever the prompt.

    It follows the engine's model interface (cfg, parameters, output_weight, next_logits) and ignores the cache.
    """

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = V, max_seq_len: int = 256) -> None:
        super().__init__()
        self.cfg = tiny_cfg(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.script = script
        self.prompt_len = prompt_len
        self.weight = nn.Parameter(torch.zeros(vocab_size, 1))

    def output_weight(self) -> torch.Tensor:
        return self.weight

    def next_logits(self, idx, positions, cache, last=None) -> torch.Tensor:
        fed = positions[:, -1] if last is None else positions[torch.arange(idx.shape[0]), last]
        k = (fed + 1 - self.prompt_len).clamp(max=len(self.script) - 1)  # index of the token to produce
        logits = torch.full((idx.shape[0], self.cfg.vocab_size), -10.0)
        logits[torch.arange(idx.shape[0]), torch.tensor(self.script)[k]] = 10.0
        return logits

"""Construct a Transformer the one supported way (meta build, materialise, init) and count its parameters."""

from __future__ import annotations

import torch

from tokenmill.errors import UserError
from tokenmill.model.config import ModelConfig
from tokenmill.model.transformer import Transformer


def _check_vocab(cfg: ModelConfig) -> None:
    if cfg.vocab_size <= 0:
        raise UserError(
            f"model.vocab_size={cfg.vocab_size} means 'from the tokenizer', which build_model cannot "
            f"know: set model.vocab_size or let the trainer resolve it from the tokenizer"
        )


def build_meta(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: shapes only, no memory (for counting and for sharded materialisation)."""
    _check_vocab(cfg)
    with torch.device("meta"):
        return Transformer(cfg)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build on meta, allocate on `device` with `to_empty`, then `init_weights()` (uses the global torch RNG)."""
    model = build_meta(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts, computed on the meta device (no memory, even for billions of parameters).

    `embedding` = the input tables (tok_emb, plus pos_emb for learned positions); a tied head shares tok_emb and
    is counted once. `non_embedding` = total - embedding (it includes an untied head).
    """
    model = build_meta(cfg)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embedding = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "trainable": trainable}

"""The decoder model: config, components (norms, positions, FFNs, attention, init) and the Transformer."""

from tokenmill.model.build import build_meta, build_model, param_counts
from tokenmill.model.config import ModelConfig
from tokenmill.model.transformer import Block, Transformer

__all__ = ["Block", "ModelConfig", "Transformer", "build_meta", "build_model", "param_counts"]

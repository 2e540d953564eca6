"""Python entry points for using models outside the trainer: `create_model`, `load_model`, `load_tokenizer`.

    import tokenmill
    model = tokenmill.load_model("runs/demo")              # latest valid checkpoint of a run
    model = tokenmill.load_model("runs/demo", which="best") # best by eval loss
    model = tokenmill.create_model("tiny", vocab_size=4096) # fresh, initialised weights
    tokenizer = tokenmill.load_tokenizer("runs/demo")      # the tokenizer that checkpoint was trained with

Every function that takes a checkpoint resolves it with `checkpoint.find.find_checkpoint` (also importable
from here), which verifies the folder against its manifest first; nothing is read with a plain unpickler.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tokenmill.checkpoint.find import find_checkpoint
from tokenmill.checkpoint.folder import CONFIG, TOKENIZER
from tokenmill.errors import UserError

if TYPE_CHECKING:
    import torch

    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.model.config import ModelConfig
    from tokenmill.model.transformer import Transformer

__all__ = ["create_model", "find_checkpoint", "load_model", "load_tokenizer", "model_config_from"]


def model_config_from(source: Any, vocab_size: int | None = None) -> ModelConfig:
    """A validated ModelConfig from a preset name ("tiny", "gpt2,tiny"), a Config, a ModelConfig or a mapping
    (either a whole config with a `model:` section or the model section itself)."""
    from tokenmill.config import Config, build_section, load_config
    from tokenmill.model.config import ModelConfig

    if isinstance(source, str):
        cfg = load_config([name for name in source.split(",") if name]).model
    elif isinstance(source, Config):
        cfg = source.model
    elif isinstance(source, ModelConfig):
        cfg = source
    elif isinstance(source, dict):
        cfg = build_section(ModelConfig, source.get("model", source), "model")
    else:
        raise UserError(f"create_model takes a preset name, Config, ModelConfig or dict, not {type(source).__name__}")
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)
    cfg.validate()
    return cfg


def create_model(
    preset_or_cfg: Any = "tiny", vocab_size: int | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """A freshly initialised Transformer (model.vocab_size must be set, here or in the config)."""
    from tokenmill.model.build import build_model

    return build_model(model_config_from(preset_or_cfg, vocab_size), device=device)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", which: str = "latest", dtype: torch.dtype | None = None
) -> Transformer:
    """A ready Transformer (eval mode) from a checkpoint folder or a run folder.

    The model is rebuilt from the checkpoint's config.yaml and its weights loaded from safetensors
    (no pickle). `dtype` optionally casts the weights (e.g. torch.bfloat16 for inference). A sharded
    checkpoint (FSDP, pipeline) is made single-file once with `tokenmill checkpoint consolidate`.
    """
    from tokenmill.checkpoint.manager import load_model_weights
    from tokenmill.model.build import build_model

    folder = find_checkpoint(path, which)
    cfg = model_config_from(_checkpoint_config(folder))
    model = build_model(cfg, device=device)  # init also fills non-persistent buffers (RoPE tables)
    load_model_weights(model, folder)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_tokenizer(path: str | Path, which: str = "latest") -> Tokenizer:
    """The tokenizer a checkpoint was trained with, without training or downloading anything.

    Looked up in order: `tokenizer.json` inside the checkpoint folder; the run folder's tokenizer cache (the
    one `train` built for this config); the tokenizer named in the checkpoint's config when it needs no files
    ('byte') or is a tokenizer.json path that still exists.
    """
    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.data.tokenizer import load_tokenizer as load_named

    folder = find_checkpoint(path, which)
    if (folder / TOKENIZER).is_file():
        return Tokenizer.from_file(folder / TOKENIZER)
    data = _checkpoint_config(folder).get("data") or {}
    name = str(data.get("tokenizer", "bpe"))
    if name == "bpe":
        cache = folder.parent.parent / "tokenizer"
        vocab = data.get("tokenizer_vocab_size")
        found = sorted(cache.glob(f"tokenizer-bpe{vocab}-*/tokenizer.json")) if cache.is_dir() else []
        if len(found) == 1:
            return Tokenizer.from_file(found[0].parent)
        raise UserError(
            f"checkpoint {folder} holds no {TOKENIZER} and its run folder has "
            f"{'several cached tokenizers' if found else 'no cached tokenizer'} in {cache}; load the "
            f"run's tokenizer.json yourself (tokenmill.data.tokenizer.Tokenizer.from_file(PATH))"
        )
    if name == "byte" or Path(name).exists():
        return load_named(name)
    raise UserError(
        f"checkpoint {folder} holds no {TOKENIZER} and its tokenizer {name!r} is not available "
        f"offline; load that tokenizer.json yourself (tokenmill.data.tokenizer.Tokenizer.from_file(PATH))"
    )


def _checkpoint_config(folder: Path) -> dict[str, Any]:
    """The resolved run config stored beside a checkpoint's weights, as a mapping."""
    config_file = folder / CONFIG
    if not config_file.is_file():
        raise UserError(f"checkpoint {folder} has no {CONFIG}, so its model and tokenizer are unknown")
    try:
        data = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"checkpoint file {config_file} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint file {config_file} is not a mapping of config sections")
    return data

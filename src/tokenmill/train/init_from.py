"""`train.init_from`: a new run that starts from existing weights (continued pretraining, annealing from the
constant phase of an infinite schedule, or a model imported from Hugging Face with `tokenmill import`).

Only the weights are taken. The optimizer, the schedule, the data order, the RNG states and the step counter
start fresh, which is what makes it different from `--resume` (which restores all of them). When a run that
started this way is resumed, its own checkpoint wins and `init_from` is not read again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tokenmill.errors import UserError


def load_initial_weights(engine: Any, cfg: Any, tokenizer: Any) -> Path:
    """Load the weights of `cfg.train.init_from` (a checkpoint, or a run folder's latest valid one; sharded,
    single-file or weights-only) into the engine's materialised model under any layout (single, DDP, FSDP
    shards, pipeline stages); return the checkpoint folder.

    A checkpoint that carries its tokenizer must have been trained with this run's tokenizer.
    """
    from tokenmill.checkpoint.find import find_checkpoint
    from tokenmill.checkpoint.folder import TOKENIZER, is_sharded, read_manifest
    from tokenmill.checkpoint.parts import ModelState
    from tokenmill.checkpoint.sharded import load_full_state, load_sharded
    from tokenmill.checkpoint.weights import read_weights
    from tokenmill.data.tokenizer import Tokenizer

    folder = find_checkpoint(cfg.train.init_from)
    if (folder / TOKENIZER).is_file():
        theirs = Tokenizer.from_file(folder / TOKENIZER)
        if theirs.hash != tokenizer.hash:
            raise UserError(
                f"train.init_from={cfg.train.init_from} was trained with tokenizer {theirs.hash} but this run uses "
                f"{tokenizer.hash} ({tokenizer.name}); set data.tokenizer={folder / TOKENIZER}"
            )
    try:
        if is_sharded(folder, read_manifest(folder)):
            load_sharded(folder, engine.model)  # every layout reads its own slices of the shards
        elif engine.sharded:
            load_full_state(engine.model, None, read_weights(folder))  # each shard / stage keeps its part
        else:
            ModelState(engine.model).load_state_dict(read_weights(folder))
    except UserError as err:
        raise UserError(f"train.init_from={cfg.train.init_from}: {err}{_model_changes(folder, cfg)}") from None
    return folder


def _model_changes(folder: Path, cfg: Any) -> str:
    """' (changed: model.d_model 64 -> 128)': model settings that differ from the checkpoint's config.yaml."""
    from tokenmill.checkpoint.folder import CONFIG

    try:
        saved = (yaml.safe_load((folder / CONFIG).read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    now = cfg.to_dict()["model"]
    changed = [f"model.{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if saved.get(k) != now.get(k)]
    return f" (changed: {', '.join(changed)})" if changed else ""

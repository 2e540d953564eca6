"""One checkpoint as a ready model, its tokenizer and its run config: what export and eval start from.

Single-file and sharded (FSDP / pipeline, torch.distributed.checkpoint) checkpoints load alike: a sharded one
is consolidated in memory by reading every shard into a plain single-device model, without a process group.
The checkpoint is verified once (sizes and sha256 against its manifest) by `find_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tokenmill.errors import UserError


@dataclass
class LoadedCheckpoint:
    model: Any  # tokenmill Transformer, eval mode
    tokenizer: Any  # tokenmill Tokenizer
    folder: Path  # the verified checkpoint folder (<run>/checkpoints/step_...)
    config: dict[str, Any]  # the resolved run config stored beside the weights

    @property
    def run_dir(self) -> Path:
        return self.folder.parent.parent

    @property
    def step(self) -> int:
        from tokenmill.checkpoint.find import parse_step

        return parse_step(self.folder.name) or 0


def read_run_config(folder: Path) -> dict[str, Any]:
    """The run config (config.yaml) stored in a checkpoint folder, as a mapping of sections."""
    from tokenmill.checkpoint.folder import CONFIG

    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {CONFIG}, so its model is unknown")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"checkpoint file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint file {path} is not a mapping of config sections")
    return data


def load_checkpoint(
    path: str | Path,
    which: str = "latest",
    device: str | torch.device = "cpu",
    check_model: Callable[[Any], Any] | None = None,
) -> LoadedCheckpoint:
    """The model (eval mode, fp32), tokenizer and config of a checkpoint folder or of a run folder's latest
    (or best) valid checkpoint. `check_model(model_config)` runs before any weights are read (a refusal is
    cheap)."""
    from tokenmill.api import find_checkpoint, load_tokenizer, model_config_from
    from tokenmill.checkpoint.folder import is_sharded, read_manifest
    from tokenmill.checkpoint.manager import load_model_weights
    from tokenmill.checkpoint.parts import ModelState
    from tokenmill.checkpoint.sharded import read_full_weights
    from tokenmill.model.build import build_model

    folder = find_checkpoint(path, which)
    config = read_run_config(folder)
    model_cfg = model_config_from(config)
    if check_model is not None:
        check_model(model_cfg)
    tokenizer = load_tokenizer(folder)
    model = build_model(model_cfg, device=device)  # init also fills RoPE tables
    if is_sharded(folder, read_manifest(folder)):
        ModelState(model).load_state_dict(read_full_weights(folder))  # every shard, consolidated in memory
    else:
        load_model_weights(model, folder)
    return LoadedCheckpoint(model.eval(), tokenizer, folder, config)

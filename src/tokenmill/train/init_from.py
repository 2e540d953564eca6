"""`train.init_from`: a new run that starts from existing weights (continued pretraining, annealing from the
constant phase of an infinite schedule, or a model imported from Hugging Face with `tokenmill import`).

Only the weights are taken. The optimizer, the schedule, the data order, the RNG states and the step counter
start fresh, which is what makes it different from `--resume` (which restores all of them). When a run that
started this way is resumed, its own checkpoint wins and `init_from` is not read again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.errors import UserError


def load_initial_weights(engine: Any, cfg: Any, tokenizer: Any) -> Path:
    """Load the weights of `cfg.train.init_from` (a checkpoint, or a run folder's latest valid one) into the
    engine's materialised model under any layout (single, DDP, FSDP shards, pipeline stages); return the folder.

    A checkpoint that carries its tokenizer must have been trained with this run's tokenizer.
    """
    from tokenmill.api import find_checkpoint
    from tokenmill.checkpoint.manager import Checkpointer
    from tokenmill.data.tokenizer import Tokenizer

    folder = find_checkpoint(cfg.train.init_from)
    if (folder / "tokenizer.json").is_file():
        theirs = Tokenizer.from_file(folder)
        if theirs.hash != tokenizer.hash:
            raise UserError(
                f"train.init_from={cfg.train.init_from} was trained with tokenizer {theirs.hash} but this "
                f"run uses {tokenizer.hash} ({tokenizer.name}); set "
                f"data.tokenizer={folder / 'tokenizer.json'}"
            )
    Checkpointer(folder.parent.parent).load(folder, engine=engine, cfg=cfg, restore_rng_state=False)
    return folder

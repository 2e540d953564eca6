"""Import a Hugging Face GPT-2 / Llama / Qwen3 model as a tokenmill run folder.

The result is an ordinary run folder, so everything that takes a run or checkpoint accepts it (`tokenmill.load_model`,
`tokenmill eval`, `tokenmill export`, `train.init_from`):

    RUN/config.yaml                        a complete run config: the model section computes what the HF model
                                           computes; data.tokenizer points at RUN/tokenizer/tokenizer.json
    RUN/tokenizer/tokenizer.json           the model's tokenizer (kept by `train --overwrite`, like a BPE cache)
    RUN/checkpoints/step_00000000/         weights (fp32) + config + the tokenizer, under the checkpoint manifest

Continue pretraining with `tokenmill train RUN/config.yaml --train.init_from=RUN --data.sources=[...]
--train.out_dir=NEW`: the weights load into a fresh optimizer and schedule. Weights are read from safetensors
only (never a pickled pytorch_model.bin), and nothing at RUN changes unless the whole import succeeds: it is
built beside RUN and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.data.tokenizer import HUB_NAME
from tokenmill.errors import UserError

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]  # config, weights, tokenizer; no *.bin
TOKENIZER_DIR = "tokenizer"


@dataclass
class ImportResult:
    run_dir: Path
    checkpoint: Path
    architecture: str  # model_type of the HF config
    parameters: int
    tokenizer: Any


def resolve_hf_source(source: str) -> Path:
    """A local Hugging Face model folder, or the snapshot of a Hub repo (downloaded once, then from the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    if not HUB_NAME.match(source):
        raise UserError(f"{source} is neither a local model folder nor a Hugging Face Hub name like 'org/model'")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES, local_files_only=offline))
    except (OSError, ValueError) as err:  # offline, unknown repo, gated model (the Hub's errors are OSErrors)
        why = (
            "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the cache"
            if offline
            else f"download failed ({type(err).__name__})"
        )
        raise UserError(f"cannot get Hugging Face model {source}: {why}; pass a local folder instead") from None


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: choose a new run folder")


def import_hf(source: str, out: str | Path) -> ImportResult:
    """Convert the HF model `source` (folder or Hub name) into the run folder `out`; see the module docstring."""
    from tokenmill.data.tokenizer import check_vocab
    from tokenmill.interop.hf import load_pretrained, model_config_from_hf, transformers_module
    from tokenmill.interop.hf_tokenizer import tokenizer_from_hf

    out = Path(out).absolute()
    check_out_dir(out)
    folder = resolve_hf_source(source)
    tf = transformers_module()
    try:
        hf_cfg = tf.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {folder / 'config.json'}: {str(err).splitlines()[0]}") from None
    model_cfg = model_config_from_hf(hf_cfg)  # refuses an unsupported architecture before any weights are read
    tokenizer = tokenizer_from_hf(folder)
    check_vocab(model_cfg.vocab_size, tokenizer)
    model = load_pretrained(folder)
    tmp = out.parent / f".tmp-import-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint = _write_run(tmp, out, model, tokenizer)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(
        out, out / checkpoint.relative_to(tmp), hf_cfg.model_type, sum(p.numel() for p in model.parameters()), tokenizer
    )


def run_config(model_cfg: Any, tokenizer_file: Path, run_dir: Path) -> Any:
    """The defaults with the imported model, its tokenizer, and this run folder; train.seq_len fits the context."""
    from tokenmill.config import Config

    cfg = Config()
    return replace(
        cfg,
        model=model_cfg,
        data=replace(cfg.data, tokenizer=str(tokenizer_file)),
        train=replace(cfg.train, out_dir=str(run_dir), seq_len=min(cfg.train.seq_len, model_cfg.max_seq_len)),
    ).validate()


def _write_run(tmp: Path, out: Path, model: Any, tokenizer: Any) -> Path:
    """Fill the temporary run folder `tmp` (paths inside the config already name `out`); return the checkpoint."""
    from tokenmill.checkpoint.manager import Checkpointer

    tokenizer.save(tmp / TOKENIZER_DIR)
    cfg = run_config(model.cfg, out / TOKENIZER_DIR / "tokenizer.json", out)
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    checkpointer = Checkpointer(
        tmp, cfg.checkpoint, {"model": model}, run_config=cfg, tokenizer_json=tokenizer.backend.to_str()
    )
    return checkpointer.save(0, reason="import")

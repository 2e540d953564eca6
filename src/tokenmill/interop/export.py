"""Export a checkpoint as a Hugging Face model folder that `AutoModelForCausalLM` and `AutoTokenizer` load offline.

The folder holds config.json, generation_config.json (bos/eos/pad ids, so HF `generate` stops at EOS),
model.safetensors (sharded with model.safetensors.index.json above `max_shard_size`; a tied head stored once,
as transformers' `save_pretrained` does), tokenizer.json + tokenizer_config.json (see hf_tokenizer.py; with the
checkpoint's chat template, if a fine-tuning run recorded one, as its `chat_template`, where `apply_chat_template`
reads it) and a short README.md saying how the model was trained to see documents.

Nothing at `out` changes until the new folder is complete and verified: it is written beside `out` and renamed
into place. Verification reloads the folder with transformers on the CPU and compares logits on a probe batch
with the tokenmill model. Both sides compute in fp32 from the same stored weights (a bf16 export is compared
against the tokenmill model with its weights rounded to bf16), so one tight tolerance serves every export dtype
and still catches a wrong RoPE layout, whose logits differ only slightly: torchtitan measured a KL of about
5e-6 for a wrong permutation (scripts/checkpoint_conversion/README.md), so greedy-text equality is not enough.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERIFY_TOLERANCE = 1e-3  # max |logit difference| between tokenmill and transformers, both in fp32
PROBE_SHAPE = (2, 64)  # (sequences, tokens) of the verification batch, cut to the model's context
PROBE_SEED = 0

MODEL_CARD = """# {name}

Exported from tokenmill checkpoint `{checkpoint}` as `{hf_class}` ({dtype}).

- Documents were joined with `{eos}` during training, so the model ends a document with it
  (`eos_token_id={eos_id}`) and saw it before every document: BOS is set to the same token. The vocabulary's
  `<|bos|>` (if present) was never trained.
- Text is encoded without added special tokens; special-token text inside a string is ordinary text.
"""


@dataclass
class ExportResult:
    out: Path
    hf_class: str
    dtype: str
    files: list[str]
    bytes: int
    max_logit_diff: float | None  # None when verification was skipped
    kl: float | None


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty `out` unless `force` (then it is replaced only after the new folder is done)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out} already exists and is not empty: choose another folder or pass --force to replace it"
        )


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    verify: bool = True,
    force: bool = False,
    max_shard_size: str = "5GB",
    which: str = "latest",
) -> ExportResult:
    """Write the checkpoint (or a run folder's latest/best) as a Hugging Face folder at `out`; see module doc."""
    from tokenmill.interop.hf import HF_CLASSES, check_exportable, transformers_module
    from tokenmill.interop.loading import load_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not supported: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    check_out_dir(out, force)
    transformers_module()  # a missing extra is reported before the checkpoint is read
    loaded = load_checkpoint(checkpoint, which, check_model=check_exportable)  # refuses before reading weights
    hf_class = HF_CLASSES[check_exportable(loaded.model.cfg)]
    model = round_weights(loaded.model, DTYPES[dtype])  # fp32 compute, weights exactly as they will be stored
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(model, loaded, tmp, out.name, dtype, hf_class, max_shard_size)
        diff = _verify(tmp, model, loaded.tokenizer) if verify else None
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    max_diff, kl = diff if diff is not None else (None, None)
    return ExportResult(out, hf_class, dtype, files, sum((out / f).stat().st_size for f in files), max_diff, kl)


@torch.no_grad()
def round_weights(model: Any, dtype: torch.dtype) -> Any:
    """`model` (in place) with every parameter rounded to `dtype` and kept in fp32: it computes in fp32 what the
    exported weights compute, while buffers (RoPE tables) keep full precision as in transformers."""
    for param in model.parameters():
        param.copy_(param.to(dtype))
    return model


def _write_folder(
    model: Any, loaded: Any, folder: Path, name: str, dtype: str, hf_class: str, max_shard_size: str
) -> None:
    from tokenmill.interop.hf import to_hf, transformers_module
    from tokenmill.interop.hf_tokenizer import backend_of, save_hf_tokenizer

    tok = loaded.tokenizer
    special = {
        "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id,
    }
    hf_model = to_hf(model, **special).to(DTYPES[dtype])  # exact: the weights are already rounded to dtype
    hf_model.generation_config = transformers_module().GenerationConfig(**special)
    folder.mkdir(parents=True)
    hf_model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    del hf_model
    save_hf_tokenizer(tok, folder, model.cfg.max_seq_len)
    add_chat_template(loaded.folder, folder)
    eos = backend_of(tok).id_to_token(tok.eos_id)
    card = MODEL_CARD.format(
        name=name, checkpoint=loaded.folder, hf_class=hf_class, dtype=dtype, eos=eos, eos_id=tok.eos_id
    )
    (folder / "README.md").write_text(card)


def add_chat_template(checkpoint: Path, folder: Path) -> None:
    """Copy the checkpoint's chat_template.jinja into the exported tokenizer_config.json (no template: no key)."""
    from tokenmill.checkpoint.folder import CHAT_TEMPLATE

    template = checkpoint / CHAT_TEMPLATE
    if not template.is_file():
        return
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template.read_text(encoding="utf-8")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _verify(folder: Path, model: Any, tokenizer: Any) -> tuple[float, float]:
    """(max |logit diff|, mean KL(tokenmill || HF)) on a probe batch; raises above VERIFY_TOLERANCE, or when
    AutoTokenizer encodes a probe text differently from tokenmill."""
    from tokenmill.interop.hf import transformers_module

    tf = transformers_module()
    hf_model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    batch, length = PROBE_SHAPE[0], min(PROBE_SHAPE[1], model.cfg.max_seq_len)
    probe = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(PROBE_SEED))
    ours, theirs = model(probe).float(), hf_model(probe).logits.float()  # (B, T, V)
    diff = (ours - theirs).abs().max().item()
    kl = (
        torch.nn.functional.kl_div(
            theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
        / length
    )
    if not diff <= VERIFY_TOLERANCE:  # also catches NaN
        raise UserError(
            f"export verification failed: transformers' logits differ from tokenmill's by up to {diff:.3g} "
            f"(tolerance {VERIFY_TOLERANCE:g}); nothing was written. Please report this as a bug"
        )
    text = "Export check: déjà vu <|eos|> 123\n\tdone"
    hf_ids = tf.AutoTokenizer.from_pretrained(str(folder)).encode(text, add_special_tokens=False)
    if hf_ids != tokenizer.encode(text):
        raise UserError(
            "export verification failed: AutoTokenizer encodes text differently from tokenmill's "
            "tokenizer; nothing was written. Please report this as a bug"
        )
    return diff, kl


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` (--force) is moved aside first, then removed."""
    old = out.parent / f".old-export-{out.name}-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

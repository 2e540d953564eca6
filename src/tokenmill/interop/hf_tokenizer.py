"""Tokenizers across the Hugging Face boundary: tokenmill's tokenizer as `tokenizer.json` + `tokenizer_config.json`
that `AutoTokenizer` loads with the ids tokenmill trained with, and a Hugging Face folder's tokenizer back.

What the exported config says, and why:
- EOS is tokenmill's document separator: training joins documents with it (data/packing.py), so a model stops
  by emitting it.
- BOS is the same token. tokenmill never puts a begin-of-document token in front of a training document: the
  token the model saw before every document is the previous document's EOS. Tools that condition on BOS
  (lm-eval's empty-context prefix, `generate` without a prompt) thus give the model the context it knows. The
  vocabulary's `<|bos|>` exists but was never trained.
- PAD is `<|pad|>` when the vocabulary has it (else EOS); it never occurs in training data.
- Special-token text inside a string is split like ordinary text (`split_special_tokens`), as tokenmill encodes
  it: "<|eos|>" written in a document is not a document boundary.
- No special tokens are added on encode (no post-processor), as in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.data.tokenizer import BOS, BYTE_VOCAB, EOS, PAD, Tokenizer
from tokenmill.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2, src/encoder.py), which byte-level BPE
    vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _byte_backend() -> Any:
    """A `tokenizers.Tokenizer` that encodes exactly like `Tokenizer.byte()`: id = UTF-8 byte, then the specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS, BOS, PAD])  # ids 256, 257, 258 as in Tokenizer.byte()
    if backend.token_to_id(EOS) != BYTE_VOCAB:
        raise RuntimeError("byte tokenizer export: special tokens did not land at ids 256..258")
    return backend


def backend_of(tokenizer: Tokenizer) -> Any:
    """The `tokenizers.Tokenizer` behind a tokenmill tokenizer (one is built for the byte tokenizer)."""
    return _byte_backend() if tokenizer.backend is None else tokenizer.backend


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (see the module docstring for the
    special tokens); returns the files written."""
    from tokenmill.interop.hf import transformers_module

    tf = transformers_module()
    backend = backend_of(tokenizer)
    eos = backend.id_to_token(tokenizer.eos_id)
    pad = backend.id_to_token(tokenizer.pad_id) if tokenizer.pad_id is not None else eos
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eos,
        eos_token=eos,
        pad_token=pad,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    written = [Path(p) for p in fast.save_pretrained(str(out_dir))]
    config_file = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # transformers v5 writes its own class name; the v4 name loads in v4 and v5 alike
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def tokenizer_from_hf(folder: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder: its `tokenizer.json`, or the fast tokenizer transformers
    converts from older files (vocab.json + merges.txt, ...)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(folder / "tokenizer.json")
    from tokenmill.interop.hf import transformers_module

    tf = transformers_module()
    try:
        hf_tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{folder} holds no tokenizer.json and transformers cannot load its tokenizer ({str(err).splitlines()[0]})"
        ) from None
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{folder} holds no tokenizer.json and its tokenizer has no fast (tokenizers) version; "
            f"convert it to tokenizer.json first"
        )
    return Tokenizer.from_backend(backend, str(folder))

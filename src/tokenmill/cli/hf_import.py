"""`tokenmill import HF_DIR|HUB_NAME --out RUN`: a Hugging Face GPT-2, Llama or Qwen3 model as a tokenmill run.

RUN becomes a normal run folder (config.yaml, tokenizer, checkpoints/step_00000000) that `tokenmill eval`,
`tokenmill export`, `tokenmill.load_model` and `train.init_from=RUN` accept. Hub names download when online
(safetensors and tokenizer files only); local folders always work offline.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="HF_DIR|HUB_NAME", help="local model folder, or a Hub name like org/model")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to create (must be new or empty)")


def run(args: argparse.Namespace) -> int:
    from tokenmill.interop.hf import quiet_transformers

    quiet_transformers()  # also reports a missing `hf` extra first
    from tokenmill.interop.hf_import import import_hf

    result = import_hf(args.source, args.out)
    tok = result.tokenizer
    print(f"imported {args.source} ({result.architecture}, {result.parameters:,} parameters) -> {result.checkpoint}")
    print(f"tokenizer: {tok.vocab_size} ids, EOS id {tok.eos_id} (documents are joined with it when training)")
    print(
        f"continue pretraining: tokenmill train {result.run_dir / 'config.yaml'} --train.init_from={result.run_dir} "
        f"--data.sources=[...] --train.out_dir=..."
    )
    return 0

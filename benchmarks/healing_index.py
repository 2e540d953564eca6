"""Cost of token healing's prefix index (generation/healing.py) by vocabulary size. Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/healing_index.py [--vocabs 8000,32000,128000] [--prompts 2000]

Each vocabulary is a byte-level BPE (the 256 byte symbols, then random words of 2-9 symbols, a third of them with
a leading space as BPE vocabularies have) with the three special tokens. `build` is the one-time cost a Generator
pays on its first healed request (decoding every token once, sorting); `heal` is the per-prompt cost (two
binary searches and the slice of allowed ids), averaged over `--prompts` prompts ending in random tokens, and
`allowed` the mean number of first-token choices. Seconds are process CPU time, less affected by other jobs.
"""

from __future__ import annotations

import argparse
import random
import time

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tokenmill.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from tokenmill.generation.healing import PrefixIndex


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE vocabulary of `vocab_size` entries (no merges needed: only decoding is measured)."""
    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    space = "\u0120"  # GPT-2's byte-to-unicode map writes " " as U+0120
    letters = [c for c in alphabet if "a" <= c <= "z"]
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        vocab.setdefault(space + word if rng.random() < 1 / 3 else word, len(vocab))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer.from_backend(backend, f"synthetic-{vocab_size}")


def measure(vocab_size: int, prompts: int) -> tuple[float, float, float]:
    """(build seconds, heal microseconds per prompt, mean allowed first tokens over healed prompts)."""
    tokenizer = synthetic_tokenizer(vocab_size)
    started = time.process_time()
    index = PrefixIndex(tokenizer, tokenizer.vocab_size)
    build = time.process_time() - started
    rng = random.Random(1)
    cases = [[rng.randrange(tokenizer.vocab_size) for _ in range(2)] for _ in range(prompts)]
    started = time.process_time()
    healed = [index.heal(case) for case in cases]
    heal = (time.process_time() - started) / prompts
    allowed = [len(h.allowed_ids) for h in healed if h is not None]
    return build, heal * 1e6, sum(allowed) / max(len(allowed), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="8000,32000,128000", help="vocabulary sizes, comma-separated")
    parser.add_argument("--prompts", type=int, default=2000, help="prompts healed per vocabulary")
    args = parser.parse_args()
    print("| vocab | build (s) | heal per prompt (us) | allowed first tokens |")
    print("|---:|---:|---:|---:|")
    for size in (int(v) for v in args.vocabs.split(",")):
        build, heal, allowed = measure(size, args.prompts)
        print(f"| {size} | {build:.2f} | {heal:.1f} | {allowed:.0f} |")


if __name__ == "__main__":
    main()

"""Small supervised fine-tuning sets (prompt/completion and messages rows) and configs for the SFT tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data_helpers import make_cfg
from tokenmill.config import Config


def qa_rows(n: int, seed: int = 0, max_words: int = 6) -> list[dict[str, str]]:
    """Prompt/completion rows tagged <q00042> (prompt) and <a00042> (completion), of varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        filler = " ".join(rng.choice(["so", "then", "what", "is"]) for _ in range(rng.randint(0, max_words)))
        rows.append({"prompt": f"<q{i:05d}> {filler} {a}+{b}=", "completion": f"{a + b} <a{i:05d}>"})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Two-turn conversations: user, assistant, user, assistant."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"<c{i:05d}> {a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                    {"role": "user", "content": "times 2?"},
                    {"role": "assistant", "content": str(2 * (a + b))},
                ]
            }
        )
    return rows


def write_rows(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_cfg(sources: list[str], *, template: str = "default", **kwargs: Any) -> Config:
    """make_cfg's loader config with data.format=prompt_completion."""
    cfg = make_cfg(sources, **kwargs)
    cfg.data.format = "prompt_completion"
    cfg.data.chat_template = template
    return cfg.validate()


def examples_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(tokens, learned-target tokens) of every example in a batch, padding left out (doc ids split them)."""
    out = []
    for tokens, targets, doc_ids in zip(batch["tokens"], batch["targets"], batch["doc_ids"], strict=True):
        labels = [-100, *targets.tolist()]  # the label of token j is target j - 1
        for doc in doc_ids.unique().tolist():
            where = (doc_ids == doc).nonzero().flatten().tolist()
            ids = tokens[where].tolist()
            learned = [labels[j] for j in where if labels[j] != -100]
            if learned:  # padding has no learned token
                out.append((ids, learned))
    return out

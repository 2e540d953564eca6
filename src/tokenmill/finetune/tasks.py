"""Built-in RL tasks: prompts with a verifiable answer, a held-out split, and the rewards that score them.

A task is a list of `Example`s (prompt, answer, extra columns for the reward functions) split once into
training and held-out examples by a hash of the prompt, so the split never depends on the seed or the order.
Training example `i` comes from a seeded permutation of the training examples per epoch, so the prompt cursor
(how many prompts were drawn) alone decides the next prompts: resuming needs nothing else.

- `copy` / `reverse`: repeat (or reverse) a 3-letter string over 8 letters: prompt "cfa|", answer "cfa" then EOS.
  Each answer token is a copy of one prompt position, which a tiny model learns from scratch under RL.
- `addition`: "12+7=" -> "19". Table-lookup arithmetic does not rise from scratch (the policy collapses before it
  finds the mapping); warm the model up with `tokenmill rl --task addition --write-sft-set PATH` and
  `tokenmill train data.format=prompt_completion ...` first.
- `mcq`: a local jsonl of multiple-choice questions (MedQA/USMLE style), one object per line:
  {"question": str, "options": {"A": str, ...} or [str, ...], "answer": "C"}; the reward is the correct letter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError

LETTERS = "abcdefgh"  # copy / reverse alphabet
STRING_LENGTH = 3
MAX_OPERAND = 20  # addition: a + b with 0 <= a, b <= MAX_OPERAND
MCQ_FIELDS = ("question", "options", "answer")
OPTION_LETTERS = string.ascii_uppercase[:10]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the completion that is exactly right (without EOS)
    columns: dict[str, Any] = field(default_factory=dict)  # more fields for the reward functions


@dataclass
class Task:
    """Examples split into training and held-out, the default rewards, and the reward that means "correct"."""

    name: str
    train: list[Example]
    heldout: list[Example]
    rewards: list[str]  # default rl.rewards
    correct: str  # the reward whose value 1.0 marks an exact match (held-out accuracy)

    def train_example(self, seed: int, index: int) -> Example:
        """Training example number `index` (0, 1, ...): epoch by epoch through a seeded permutation."""
        epoch, offset = divmod(index, len(self.train))
        order = list(range(len(self.train)))
        random.Random(f"{self.name}/{seed}/{epoch}").shuffle(order)
        return self.train[order[offset]]


def is_heldout(prompt: str, fraction: float) -> bool:
    """Stable split by prompt hash (independent of seed, order and platform)."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return digest % 10_000 < round(fraction * 10_000)


def split(name: str, examples: list[Example], fraction: float, rewards: list[str], correct: str) -> Task:
    train = [e for e in examples if not is_heldout(e.prompt, fraction)]
    heldout = [e for e in examples if is_heldout(e.prompt, fraction)]
    if not train:
        raise UserError(f"task {name}: every example is held out; lower rl.eval_fraction or add examples")
    return Task(name, train, heldout, rewards, correct)


def string_examples(transform: Callable[[str], str]) -> list[Example]:
    words = ("".join(letters) for letters in itertools.product(LETTERS, repeat=STRING_LENGTH))
    return [Example(f"{w}|", transform(w), {"answer": transform(w)}) for w in words]


def addition_examples() -> list[Example]:
    pairs = itertools.product(range(MAX_OPERAND + 1), repeat=2)
    return [Example(f"{a}+{b}=", str(a + b), {"answer": str(a + b)}) for a, b in pairs]


def copy_task(fraction: float, task_file: str = "") -> Task:
    return split("copy", string_examples(lambda w: w), fraction, ["position_match:0.5", "exact_eos:0.5"], "exact_eos")


def reverse_task(fraction: float, task_file: str = "") -> Task:
    examples = string_examples(lambda w: w[::-1])
    return split("reverse", examples, fraction, ["position_match:0.5", "exact_eos:0.5"], "exact_eos")


def addition_task(fraction: float, task_file: str = "") -> Task:
    return split("addition", addition_examples(), fraction, ["position_match:0.5", "exact_eos:0.5"], "exact_eos")


def mcq_task(fraction: float, task_file: str = "") -> Task:
    return split("mcq", read_mcq(task_file), fraction, ["mcq_letter"], "mcq_letter")


TASKS: dict[str, Callable[[float, str], Task]] = {
    "copy": copy_task,
    "reverse": reverse_task,
    "addition": addition_task,
    "mcq": mcq_task,
}


def build_task(name: str, fraction: float, task_file: str = "") -> Task:
    return TASKS[name](fraction, task_file)


# ---- mcq file --------------------------------------------------------------------------------------------


def read_mcq(path: str) -> list[Example]:
    """Every question of a jsonl file; one line naming the file, line and problem for the first bad one."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"rl.task_file={path} does not exist; give a jsonl of {{question, options, answer}} objects")
    examples = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                examples.append(mcq_example(line, f"{path}:{number}"))
    if not examples:
        raise UserError(f"rl.task_file={path} holds no questions; give one JSON object per line")
    return examples


def mcq_example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON ({err.msg}); write one object per line") from None
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object; write {{question, options, answer}} per line")
    missing = [name for name in MCQ_FIELDS if name not in row]
    if missing:
        raise UserError(f"{where} lacks field(s) {', '.join(missing)}; every line needs {', '.join(MCQ_FIELDS)}")
    options = row["options"]
    if isinstance(options, list):
        options = dict(zip(OPTION_LETTERS, options, strict=False))
    if not isinstance(options, dict) or len(options) < 2 or not all(isinstance(v, str) for v in options.values()):
        raise UserError(f"{where}: options must be a list or a letter->text mapping of at least 2 strings")
    answer = str(row["answer"]).strip().upper()
    if answer not in options:
        raise UserError(f"{where}: answer {row['answer']!r} is not one of the option letters {', '.join(options)}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise UserError(f"{where}: question must be a non-empty string")
    lines = [row["question"].strip(), *(f"{letter}. {text}" for letter, text in options.items()), "Answer:"]
    return Example("\n".join(lines) + " ", answer, {"answer": answer, "options": options})


# ---- SFT warm-up set -------------------------------------------------------------------------------------


def write_sft_set(task: Task, path: str | Path, examples: int, seed: int) -> Path:
    """A jsonl of {"prompt", "completion"} drawn from the task's *training* examples (never the held-out ones),
    for `tokenmill train data.format=prompt_completion data.sources=[PATH] train.init_from=CKPT`."""
    out = Path(path)
    if out.exists():
        raise UserError(f"{out} already exists; choose another path (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index in range(examples):
            example = task.train_example(seed, index)
            f.write(json.dumps({"prompt": example.prompt, "completion": example.answer}) + "\n")
    tmp.replace(out)
    return out

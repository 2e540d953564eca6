"""`tokenmill generate RUN|CHECKPOINT`: text from a trained model, printed when done or streamed as it comes.

    tokenmill generate runs/demo --prompt "def " --max-tokens 60 --stream
    tokenmill generate runs/demo --file prompts.txt --n 2 --temperature 0.7 --seed 0 --stop $'\\n\\n'

Prompts come from --prompt (repeatable) or --file: one prompt per line, or in a `.jsonl` file one JSON string
or {"prompt": ...} object per line. Each output is the prompt followed by its completion; with several, each
gets a header line. With --chat each prompt is a user message put through the checkpoint's chat template (the one
a fine-tuning run recorded, as `tokenmill serve` uses it) and only the answer is printed.
Token healing is on (SamplingParams.heal_prompt): a prompt ending in a space or inside a word lets the model choose
how its last token is split, so "def " continues with a word as in training; --no-heal feeds the prompt's tokens
as they are. A chat prompt ends in the template's own tokens, which are never healed.
The model and its tokenizer come from the checkpoint (or the run's latest/best one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.errors import UserError


def _number(kind: type, flag: str) -> Callable[[str], float | int]:
    """An argparse type that reports a malformed number as one UserError line (argparse would print usage)."""

    def convert(text: str) -> float | int:
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"{flag} {text!r} is not {'an integer' if kind is int else 'a number'}") from None

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN|CHECKPOINT", help="run folder or checkpoint folder")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt text (repeatable)")
    parser.add_argument(
        "--file", metavar="PROMPTS", help="prompts, one per line (.jsonl: JSON strings or objects with a 'prompt' key)"
    )
    parser.add_argument(
        "--max-tokens",
        type=_number(int, "--max-tokens"),
        default=128,
        metavar="N",
        help="tokens to generate at most per sample (default: 128)",
    )
    parser.add_argument(
        "--temperature",
        type=_number(float, "--temperature"),
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (default: 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=_number(int, "--top-k"),
        default=0,
        metavar="K",
        help="sample among the K most likely tokens; 0 = all (default: 0)",
    )
    parser.add_argument(
        "--top-p",
        type=_number(float, "--top-p"),
        default=1.0,
        metavar="P",
        help="nucleus sampling threshold in (0, 1] (default: 1 = off)",
    )
    parser.add_argument(
        "--min-p",
        type=_number(float, "--min-p"),
        default=0.0,
        metavar="P",
        help="drop tokens below P x the top probability (default: 0 = off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=_number(float, "--repetition-penalty"),
        default=1.0,
        metavar="R",
        help="penalty > 1 on tokens already present (default: 1 = off)",
    )
    parser.add_argument(
        "--seed", type=_number(int, "--seed"), default=None, metavar="S", help="same seed, same text (default: random)"
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop before this string (repeatable); EOS always stops",
    )
    parser.add_argument("--n", type=_number(int, "--n"), default=1, metavar="N", help="samples per prompt")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument(
        "--no-heal",
        action="store_true",
        help="no token healing: keep the prompt's last token instead of letting the first generated token re-split it",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message, formatted with the checkpoint's chat template (fine-tuned models)",
    )
    parser.add_argument(
        "--which",
        default="latest",
        metavar="latest|best",
        help="checkpoint of a run folder: latest valid or best eval loss (default: latest)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def read_prompts(path: Path) -> list[str]:
    """Prompts of a --file: one per non-empty line; `.jsonl`: a JSON string or {"prompt": ...} per line."""
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not valid JSON ({err.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise UserError(f"{path}:{number} must be a JSON string or an object with a string 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt")
    return prompts


def run(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.file):
        raise UserError("give the prompt with --prompt TEXT or --file PROMPTS (one of the two)")
    prompts = args.prompt or read_prompts(Path(args.file))
    if args.stream and args.n > 1:
        raise UserError("--stream prints one sample at a time: use --n 1, or drop --stream")
    from tokenmill.generation.api import default_device
    from tokenmill.generation.params import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
        n=args.n,
        heal_prompt=not args.no_heal and not args.chat,  # a chat template's tokens are exactly as in training
    )
    if not Path(args.checkpoint).exists():
        raise UserError(f"{args.checkpoint} does not exist: give a run folder or a checkpoint folder")

    from tokenmill.api import find_checkpoint, load_model, load_tokenizer
    from tokenmill.generation.engine import Generator

    tokenizer = load_tokenizer(args.checkpoint, args.which)
    encode = chat_encoder(find_checkpoint(args.checkpoint, args.which), tokenizer) if args.chat else None
    if encode is not None:
        params = dataclasses.replace(params, stop=params.stop + encode.stops)
    model = load_model(args.checkpoint, device=args.device or default_device(), which=args.which)
    generator = Generator(model, tokenizer, exclusive=True)  # the model was loaded for this command only
    ids = []
    for number, prompt in enumerate(prompts, start=1):  # every prompt checked before any output
        try:
            ids.append(generator.prompt_ids(encode(prompt) if encode is not None else prompt))
        except UserError as err:
            raise UserError(f"prompt {number}: {err}" if len(prompts) > 1 else str(err)) from None
    if encode is not None:  # print the answer only: the rendered template is not what the user typed
        prompts = ["" for _ in prompts]
    started, produced = time.perf_counter(), 0
    if args.stream:
        for prompt, prompt_ids in zip(prompts, ids, strict=False):
            sys.stdout.write(prompt)
            for delta in generator.stream(prompt_ids, params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                produced += len(delta.token_ids)
            sys.stdout.write("\n")
    else:
        completions = generator.generate(ids, params)
        for c in completions:
            if len(completions) > 1:
                print(f"=== prompt {c.prompt_index + 1}, sample {c.sample_index + 1} ({c.finish_reason}) ===")
            print(prompts[c.prompt_index] + c.text)
            produced += len(c.token_ids)
    seconds = time.perf_counter() - started
    print(f"{produced} tokens in {seconds:.2f} s ({produced / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


@dataclasses.dataclass(frozen=True)
class ChatEncoder:
    """A user message -> prompt token ids through a checkpoint's chat template, and the stops ending a turn."""

    template: Any
    tokenizer: Any
    stops: tuple[str, ...]

    def __call__(self, message: str) -> list[int]:
        from tokenmill.serve.chat import encode_chat_prompt

        return encode_chat_prompt(self.tokenizer, self.template.render([{"role": "user", "content": message}]))


def chat_encoder(checkpoint: Path, tokenizer: Any) -> ChatEncoder:
    """The checkpoint's chat template (as `tokenmill serve` uses it); a base model has none: say so."""
    from tokenmill.serve.chat import end_of_turn_stops, find_chat_template

    template = find_chat_template(checkpoint, tokenizer)
    if template is None:
        raise UserError(
            f"{checkpoint} has no chat template (a base model): drop --chat, or fine-tune it with "
            "data.format=prompt_completion, which records one"
        )
    return ChatEncoder(template, tokenizer, end_of_turn_stops(template, tokenizer))

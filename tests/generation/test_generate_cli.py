"""`tokenmill generate` and `tokenmill.generate`: a saved run produces the engine's text; bad input is one
error line with exit code 2 and leaves the run folder as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from gen_helpers import BYTE

import tokenmill
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.errors import UserError
from tokenmill.generation import Generator, SamplingParams

OVERRIDES = [
    "data.tokenizer=byte",
    "model.vocab_size=320",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "model.ffn_hidden=48",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with one checkpoint of a tiny byte-tokenizer model."""
    path = tmp_path_factory.mktemp("run")
    cfg = load_config(["tiny"], overrides=OVERRIDES)
    torch.manual_seed(0)
    Checkpointer(path, cfg.checkpoint, {"model": tokenmill.create_model(cfg)}, run_config=cfg).save(1, eval_loss=2.0)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def engine_text(run_dir: Path, prompt: str, **settings) -> list[str]:
    gen = Generator(tokenmill.load_model(run_dir), BYTE)
    return [c.text for c in gen.generate([prompt], SamplingParams(**settings))]


def test_cli_prints_prompt_and_completion(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-tokens", "10", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == "def " + engine_text(run_dir, "def ", max_new_tokens=10, temperature=0)[0] + "\n"


def test_cli_stream_equals_the_printed_text(run_dir, capsys):
    args = [
        "generate",
        str(run_dir / "checkpoints"),
        "--prompt",
        "ab",
        "--max-tokens",
        "12",
        "--seed",
        "3",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == printed


def test_cli_file_and_samples(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}) + "\n\n" + json.dumps("yz") + "\n")
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--file",
                str(prompts),
                "--n",
                "2",
                "--seed",
                "1",
                "--max-tokens",
                "6",
                "--stop",
                "q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== prompt")]
    assert len(headers) == 4 and headers[3].startswith("=== prompt 2, sample 2")
    expected = engine_text(run_dir, "yz", max_new_tokens=6, seed=1, n=2, stop=("q",), temperature=0.8)
    assert out.endswith("yz" + expected[1] + "\n")


def test_python_api(run_dir):
    completions = tokenmill.generate(run_dir, ["ab", "c"], max_new_tokens=5, temperature=0, logprobs=True)
    assert [c.prompt_index for c in completions] == [0, 1]
    assert completions[0].text == engine_text(run_dir, "ab", max_new_tokens=5, temperature=0)[0]
    assert len(completions[1].logprobs) == len(completions[1].token_ids)
    with pytest.raises(UserError, match="unknown sampling setting 'top_q'"):
        tokenmill.generate(run_dir, "ab", top_q=0.5)


BAD_INPUT = [
    (["{missing}", "--prompt", "a"], "does not exist"),
    (["{empty_run}", "--prompt", "a"], "no valid checkpoint"),
    (["{run}", "--prompt", "x" * 40], "leaves no room"),
    (["{run}", "--prompt", "a", "--max-tokens", "ten"], "--max-tokens 'ten' is not an integer"),
    (["{run}", "--prompt", "a", "--max-tokens", "0"], "max_new_tokens=0"),
    (["{run}", "--prompt", "a", "--temperature", "-1"], "temperature=-1.0"),
    (["{run}", "--prompt", "a", "--top-p", "1.5"], "top_p=1.5"),
    (["{run}", "--prompt", "a", "--n", "0"], "n=0"),
    (["{run}"], "--prompt TEXT or --file PROMPTS"),
    (["{run}", "--prompt", "a", "--file", "p.txt"], "--prompt TEXT or --file PROMPTS"),
    (["{run}", "--file", "{missing}"], "does not exist"),
    (["{run}", "--prompt", "a", "--n", "2", "--stream"], "--stream"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    names = {"run": str(run_dir), "missing": str(tmp_path / "missing"), "empty_run": str(tmp_path / "empty_run")}
    before = snapshot(run_dir), snapshot(tmp_path)
    code = main(["generate", *(a.format(**names) for a in args)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert (snapshot(run_dir), snapshot(tmp_path)) == before


def test_a_long_prompt_in_a_file_is_named(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine\n" + "x" * 40 + "\n")
    assert main(["generate", str(run_dir), "--file", str(prompts)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: prompt 2: prompt of 40 tokens leaves no room") and captured.out == ""

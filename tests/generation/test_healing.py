"""Token healing: a prompt ending in a bare-space token is prefilled without it and the first token starts with a
space; prompts it cannot help are generated exactly as without it; streaming, stops, n and the CLI keep working."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gen_helpers import reference_greedy, tiny_model

import tokenmill
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe
from tokenmill.generation import Generator, SamplingParams
from tokenmill.generation.healing import PrefixIndex
from tokenmill.train.evaluation import write_samples

CODE = (
    "def foo(x):\n    return x + 1\n\nimport os\nimport sys\n\n"
    "class Bar:\n    def baz(self, y):\n        return self.y * 2\n\n    def default(self):\n        pass\n"
    "naïve = 'café'\n"
)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE trained on a little code: "def " ends in a bare " " token that " x", " y", ... extend."""
    return train_bpe(iter([CODE] * 30), 400, None, progress=False)


def model_vocab(tokenizer: Tokenizer) -> int:
    return -(-tokenizer.vocab_size // 64) * 64


@pytest.fixture(scope="module")
def generator(bpe) -> Generator:
    return Generator(tiny_model(vocab_size=model_vocab(bpe), max_seq_len=64), bpe)


def texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def test_prefix_index_finds_exactly_the_tokens_whose_text_extends_a_string(bpe):
    index = PrefixIndex(bpe, bpe.vocab_size)
    ordinary = [i for i in range(bpe.vocab_size) if i not in (bpe.eos_id, bpe.bos_id, bpe.pad_id)]
    for prefix in (" ", "d", "def", "    ", "re", "<|", "zzz"):
        expected = sorted(i for i in ordinary if bpe.decode([i]).startswith(prefix))
        assert sorted(index.extensions(prefix)) == expected, prefix
    assert bpe.eos_id not in index.extensions("<")  # special tokens stand for no text


def test_trailing_space_token_is_removed_and_the_first_token_starts_with_a_space(bpe, generator):
    prompt = bpe.encode("def ")
    assert texts(bpe, prompt)[-1] == " "
    healing = PrefixIndex(bpe, bpe.vocab_size).heal(prompt)
    assert healing is not None and healing.prompt_ids == prompt[:-1] and healing.removed_text == " "
    assert prompt[-1] in healing.allowed_ids and len(healing.allowed_ids) > 1

    done = generator.generate(["def "], SamplingParams(max_new_tokens=6, temperature=0, heal_prompt=True))[0]
    first = done.token_ids[0]
    assert bpe.decode([first]).startswith(" ") and first != prompt[-1]
    # greedy over the tokens that start with " ", after the prompt without its " " (plain forward, no cache)
    model = generator.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt[:-1]]))[0, -1]
    mask = torch.full_like(logits, float("-inf"))
    mask[healing.allowed_ids] = 0
    assert first == int((logits + mask).argmax())
    rest = reference_greedy(model, [*prompt[:-1], first], 5, bpe.vocab_size, bpe.eos_id)
    assert done.token_ids == [first, *rest]
    # the text leaves out the space the prompt already has: prompt + text is the decoded healed sequence
    assert done.text == bpe.decode(done.token_ids)[1:]
    assert "def " + done.text == bpe.decode([*prompt[:-1], *done.token_ids])


def test_healing_changes_the_generation_of_a_trailing_space_prompt(generator):
    on, off = (
        generator.generate(["def "], SamplingParams(max_new_tokens=6, temperature=0, heal_prompt=heal))[0]
        for heal in (True, False)
    )
    assert on.token_ids != off.token_ids


def test_prompts_healing_cannot_help_are_generated_unchanged(bpe, generator):
    index = PrefixIndex(bpe, bpe.vocab_size)
    unextended = next(
        i
        for i in index.ids
        if [j for j in index.extensions(bpe.decode([i])) if bpe.decode([j]) != bpe.decode([i])] == []
    )
    incomplete = bpe.backend.token_to_id("Ã")  # the byte 0xC3 alone: the start of "é", not valid UTF-8 on its own
    assert "\ufffd" in bpe.decode([incomplete])
    prompts = [
        [*bpe.encode("def"), unextended],  # no other token extends the last one
        bpe.encode(" "),  # a single token
        [*bpe.encode("x = "), incomplete],
        [*bpe.encode("x = "), bpe.eos_id],  # a special token
    ]
    for prompt in prompts:
        assert index.heal(prompt) is None
        on, off = (
            generator.generate([prompt], SamplingParams(max_new_tokens=8, seed=3, logprobs=True, heal_prompt=heal))[0]
            for heal in (True, False)
        )
        assert (on.token_ids, on.text, on.logprobs, on.finish_reason) == (
            off.token_ids,
            off.text,
            off.logprobs,
            off.finish_reason,
        )


def test_a_tokenizer_whose_tokens_lose_their_space_alone_is_never_healed():
    """SentencePiece's Metaspace decoder reads "▁def" alone as "def": token texts cannot be matched to the prompt."""
    from tokenizers import SentencePieceBPETokenizer

    sentencepiece = SentencePieceBPETokenizer(unk_token="<unk>")
    sentencepiece.train_from_iterator([CODE] * 20, 120, special_tokens=[*SPECIAL_TOKENS, "<unk>"], show_progress=False)
    tokenizer = Tokenizer.from_backend(sentencepiece._tokenizer, "sentencepiece")
    prompt = tokenizer.encode("x = def")
    assert texts(tokenizer, prompt)[-1] == "def" and tokenizer.decode(prompt) == "x = def"
    index = PrefixIndex(tokenizer, tokenizer.vocab_size)
    assert index.extensions("") == [] and index.heal(prompt) is None
    generator = Generator(tiny_model(vocab_size=model_vocab(tokenizer), max_seq_len=64), tokenizer)
    on, off = (
        generator.generate([prompt], SamplingParams(max_new_tokens=6, seed=2, heal_prompt=heal))[0]
        for heal in (True, False)
    )
    assert (on.token_ids, on.text) == (off.token_ids, off.text)


def test_streamed_deltas_add_up_to_the_healed_text(bpe, generator):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, heal_prompt=True, logprobs=True)
    done = generator.generate(["import "], params)[0]
    deltas = list(generator.stream("import ", params))
    assert "".join(d.text for d in deltas) == done.text
    assert [t for d in deltas for t in d.token_ids] == done.token_ids
    assert [p for d in deltas for p in d.logprobs] == done.logprobs and len(done.logprobs) == 12
    assert deltas[-1].finish_reason == done.finish_reason == "length"
    assert bpe.decode(done.token_ids).startswith(" ") and done.text == bpe.decode(done.token_ids)[1:]


def test_seeded_healing_is_deterministic_and_n_samples_share_the_prompt(bpe, generator):
    params = SamplingParams(max_new_tokens=8, seed=11, n=3, heal_prompt=True)
    first, again = (generator.generate(["class "], params) for _ in range(2))
    assert [(c.token_ids, c.text) for c in first] == [(c.token_ids, c.text) for c in again]
    assert [c.sample_index for c in first] == [0, 1, 2]
    for c in first:
        assert bpe.decode([c.token_ids[0]]).startswith(" ") and c.text == bpe.decode(c.token_ids)[1:]
    alone = generator.generate(["class "], SamplingParams(max_new_tokens=8, seed=11, heal_prompt=True))[0]
    assert alone.token_ids == first[0].token_ids  # sample 0 does not depend on how many samples share the prefill


def test_healed_and_plain_requests_batched_together_match_their_runs_alone(generator):
    healed = SamplingParams(max_new_tokens=6, temperature=0, heal_prompt=True)
    plain = SamplingParams(max_new_tokens=6, temperature=0)
    together = [generator.submit("def ", healed), generator.submit("def ", plain, prompt_index=1)]
    together = [r.completions()[0].token_ids for r in together]
    alone = [generator.generate(["def "], p)[0].token_ids for p in (healed, plain)]
    assert together == alone


def test_stop_strings_are_matched_in_the_new_text_only(bpe, generator):
    """The removed " " is part of the first token but not of the completion: a stop " " ends at the next space."""
    params = SamplingParams(max_new_tokens=12, temperature=0, heal_prompt=True)
    full = generator.generate(["def "], params)[0].text
    assert " " in full
    stopped = generator.generate(["def "], dataclasses.replace(params, stop=(" ",)))[0]
    assert stopped.text == full[: full.index(" ")] and stopped.finish_reason == "stop"
    assert stopped.text  # a match on the removed " " would have ended the text before it began


def test_the_healed_token_counts_towards_max_new_tokens(bpe, generator):
    done = generator.generate(["def "], SamplingParams(max_new_tokens=1, temperature=0, heal_prompt=True))[0]
    assert len(done.token_ids) == 1 and done.finish_reason == "length"
    assert done.text == bpe.decode(done.token_ids)[1:]


def test_heal_prompt_must_be_a_bool():
    with pytest.raises(tokenmill.errors.UserError, match="heal_prompt"):
        SamplingParams(heal_prompt="yes")


def test_training_samples_are_healed(bpe):
    model = tiny_model(vocab_size=model_vocab(bpe), max_seq_len=64)
    cfg = load_config(["tiny"], overrides=["eval.sample_tokens=5", "train.seed=4"])
    logged = []
    sinks = SimpleNamespace(log=lambda step, metrics, kind: logged.append(metrics))
    samples = write_samples(model, cfg, bpe, SimpleNamespace(is_main=True), sinks, 1)
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_k=50, seed=4, heal_prompt=True)
    prompts = list(cfg.eval.sample_prompts)
    expected = {p: p + c.text for p, c in zip(prompts, Generator(model, bpe).generate(prompts, params), strict=True)}
    assert samples == expected and logged == [{"samples": expected}]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe) -> Path:
    """A run folder with one checkpoint of a tiny model whose tokenizer.json is the BPE above."""
    path = tmp_path_factory.mktemp("run")
    overrides = [
        f"model.vocab_size={model_vocab(bpe)}",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_seq_len=32",
        "model.ffn_hidden=48",
    ]
    cfg = load_config(["tiny"], overrides=overrides)
    torch.manual_seed(0)
    model = tokenmill.create_model(cfg)
    Checkpointer(path, cfg.checkpoint, {"model": model}, run_config=cfg, tokenizer_json=bpe.backend.to_str()).save(1)
    return path


def test_cli_heals_by_default_and_not_with_no_heal(bpe_run, capsys):
    args = ["generate", str(bpe_run), "--prompt", "def ", "--max-tokens", "6", "--temperature", "0"]
    gen = Generator(tokenmill.load_model(bpe_run), tokenmill.load_tokenizer(bpe_run))
    expected = {
        heal: "def " + gen.generate(["def "], SamplingParams(max_new_tokens=6, temperature=0, heal_prompt=heal))[0].text
        for heal in (True, False)
    }
    assert expected[True] != expected[False]
    assert main(args) == 0
    assert capsys.readouterr().out == expected[True] + "\n"
    assert main([*args, "--no-heal"]) == 0
    assert capsys.readouterr().out == expected[False] + "\n"


@pytest.mark.parametrize(
    "body, words",
    [
        ({"prompt": "a", "token_healing": "yes"}, "valid boolean"),
        ({"prompt": "a", "token_healing": 1}, "valid boolean"),
        ({"prompt": "a", "token_healing": True, "logprobs": 1}, "token_healing with logprobs"),
    ],
)
def test_server_rejects_a_bad_token_healing_field(body, words):
    from tokenmill.serve.schema import APIError, CompletionRequest, parse_request

    with pytest.raises(APIError) as caught:
        parse_request(json.dumps(body).encode(), CompletionRequest)
    assert caught.value.status == 400 and caught.value.param == "token_healing" and words in caught.value.message


def test_server_heals_only_when_asked(bpe_run):
    pytest.importorskip("fastapi", reason="fastapi is in the serve extra")
    from fastapi.testclient import TestClient

    from tokenmill.serve.app import create_app
    from tokenmill.serve.config import ServeSettings
    from tokenmill.serve.loading import load_served_model

    gen = Generator(tokenmill.load_model(bpe_run), tokenmill.load_tokenizer(bpe_run))
    expected = {
        heal: gen.generate(["def "], SamplingParams(max_new_tokens=6, temperature=0, heal_prompt=heal))[0].text
        for heal in (True, False)
    }
    app = create_app(load_served_model(bpe_run, device="cpu"), ServeSettings(model_name="m"))
    body = {"prompt": "def ", "max_tokens": 6, "temperature": 0}
    with TestClient(app) as client:
        plain = client.post("/v1/completions", json=body).json()
        healed = client.post("/v1/completions", json={**body, "token_healing": True}).json()
    assert (healed["choices"][0]["text"], plain["choices"][0]["text"]) == (expected[True], expected[False])
    # the healed token is generated again: it counts as a completion token, not also as a prompt token
    tokenizer = tokenmill.load_tokenizer(bpe_run)
    prompt = tokenizer.encode("def ")
    kept = len(PrefixIndex(tokenizer, tokenizer.vocab_size).heal(prompt).prompt_ids)
    assert kept < len(prompt) == plain["usage"]["prompt_tokens"]
    assert healed["usage"]["prompt_tokens"] == kept

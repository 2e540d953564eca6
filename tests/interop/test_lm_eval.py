"""The native lm-eval adapter: log-likelihoods are sums of `model.loss`, every request type equals lm-eval's own
HFLM on the exported folder, generation honours `until` and the token budget, and lm-eval can build it by name."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from interop_cases import TEXTS  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from tokenmill.api import load_tokenizer  # noqa: E402
from tokenmill.eval.tasks import run_tasks, task_scores  # noqa: E402
from tokenmill.interop.export import export_hf  # noqa: E402
from tokenmill.interop.lm_eval import TokenmillLM  # noqa: E402

PAIRS = [
    ("The quick brown", " fox jumps over"),
    ("def add(x, y):", "\n    return x + y"),
    ("Déjà", " vu: naïve"),
    ("", "Zürich, Kraków"),
    ("A document may mention ", "<|eos|> as text"),
]
LONG = " ".join(TEXTS[:6])  # longer than the 64-token context: several rolling windows
GEN = [
    ("def add(x, y):", {"until": ["\n\n"], "max_gen_toks": 8}),
    ("The quick", {"until": "fox", "do_sample": False, "max_gen_toks": 7}),  # a string, not a list
    ("Zürich", {"max_new_tokens": 5}),
]  # lm-eval's alias of max_gen_toks


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def loss_sum(model, ids: list[int]) -> float:
    """-log p of ids[1:] given the tokens before each, from the training loss."""
    if len(ids) < 2:
        return 0.0
    with torch.no_grad():
        return model.loss(torch.tensor([ids]), reduction="sum").item()


@pytest.fixture
def saved(make_run):
    run, model, _ = make_run("llama-gqa-tied")
    return run, model, load_tokenizer(run)


def test_loglikelihoods_are_sums_of_model_loss(saved):
    _, model, tok = saved
    lm = TokenmillLM(model=model, tokenizer=tok, batch_size=2)
    results = lm.loglikelihood(requests("loglikelihood", PAIRS[:4]))
    for (context, continuation), (logp, _) in zip(PAIRS, results):
        ctx = tok.encode(context) if context else [tok.eos_id]  # the empty context is the document separator
        cont = tok.encode(context + continuation)[len(tok.encode(context)) :] if context else tok.encode(continuation)
        expected = -(loss_sum(model, ctx + cont) - loss_sum(model, ctx))
        assert logp == pytest.approx(expected, abs=1e-4)
    ctx = tok.encode("The quick brown")
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    greedy = lm._loglikelihood_tokens([((None, None), ctx, [best]), ((None, None), ctx, [(best + 1) % 320])])
    assert [flag for _, flag in greedy] == [True, False]


def test_rolling_loglikelihood_is_the_document_loss(saved):
    _, model, tok = saved
    lm = TokenmillLM(model=model, tokenizer=tok)
    (logp,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXTS[1],)]))
    assert logp == pytest.approx(-loss_sum(model, [tok.eos_id, *tok.encode(TEXTS[1])]), abs=1e-4)


def test_generate_until_truncates_at_stop_strings_and_budget(saved):
    _, model, tok = saved
    lm = TokenmillLM(model=model, tokenizer=tok)
    (free,) = lm.generate_until(requests("generate_until", [("The quick", {"until": [], "max_gen_toks": 10})]))
    assert 4 <= len(free) and len(tok.encode(free)) <= 10
    stop = free[2:4]
    (cut,) = lm.generate_until(requests("generate_until", [("The quick", {"until": [stop], "max_gen_toks": 10})]))
    assert cut == free.split(stop)[0]


def test_requests_equal_hflm_on_the_exported_folder(saved, tmp_path):
    from lm_eval.models.huggingface import HFLM

    run, model, tok = saved
    export_hf(run, tmp_path / "hf", verify=False)
    ours = TokenmillLM(model=model, tokenizer=tok, batch_size=3)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), batch_size=3, device="cpu")
    assert theirs.prefix_token_id == ours.prefix_token_id == tok.eos_id
    mine, hf = (lm.loglikelihood(requests("loglikelihood", PAIRS)) for lm in (ours, theirs))
    assert [g for _, g in mine] == [g for _, g in hf]
    assert all(a == pytest.approx(b, abs=1e-4) for (a, _), (b, _) in zip(mine, hf))
    docs = [(TEXTS[0],), (LONG,)]
    mine, hf = (lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs)) for lm in (ours, theirs))
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in zip(mine, hf))
    mine, hf = (lm.generate_until(requests("generate_until", GEN)) for lm in (ours, theirs))
    assert mine == hf


def inline_tasks(tmp_path) -> list[dict]:
    """One task per request type over a local JSONL file (lm-eval's "Using Local Datasets")."""
    rows = [
        {
            "question": f"What follows {i}?",
            "choices": [str(i + 1), str(i + 2), "no"],
            "label": i % 3,
            "text": TEXTS[i % 4],
        }
        for i in range(6)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    return [
        {
            "task": "tm_choice",
            **local,
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}],
        },
        {
            "task": "tm_rolling",
            **local,
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
        {
            "task": "tm_generate",
            **local,
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{choices[0]}}",
            "generation_kwargs": {"until": ["\n", "?"], "max_gen_toks": 6},
            "metric_list": [{"metric": "exact_match"}],
        },
    ]


def test_task_scores_equal_hflm(saved, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from tokenmill.eval.tasks import task_manager

    run, model, tok = saved
    export_hf(run, tmp_path / "hf", verify=False)
    tasks = inline_tasks(tmp_path)
    ours = task_scores(run_tasks(model, tok, tasks, include_defaults=False, limit=4, bootstrap_iters=0))
    hf_results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(tmp_path / "hf"), batch_size=2, device="cpu"),
        tasks=tasks,
        task_manager=task_manager(None, False),
        limit=4,
        bootstrap_iters=0,
    )
    theirs = task_scores(hf_results)
    assert (
        set(ours)
        == {"tm_choice/acc", "tm_rolling/word_perplexity", "tm_rolling/bits_per_byte", "tm_generate/exact_match"}
        == set(theirs)
    )
    assert all(ours[k] == pytest.approx(theirs[k], rel=1e-4) for k in ours), (ours, theirs)


def test_lm_eval_builds_it_by_name(saved):
    run, model, _ = saved
    cls = lm_eval.api.registry.get_model("tokenmill")
    assert cls is TokenmillLM
    # the keywords lm-eval always passes to a model constructor
    lm = cls.create_from_arg_string(f"checkpoint={run}", {"batch_size": "auto", "max_batch_size": 4, "device": "cpu"})
    assert lm.batch_size == 4 and lm.max_length == 64 and str(lm.device) == "cpu"
    ((logp, _),) = lm.loglikelihood(requests("loglikelihood", PAIRS[:1]))
    ((expected, _),) = TokenmillLM(model=model, tokenizer=lm.tokenizer).loglikelihood(
        requests("loglikelihood", PAIRS[:1])
    )
    assert logp == pytest.approx(expected, abs=1e-6)

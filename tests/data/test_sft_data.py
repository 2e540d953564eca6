"""SFT data (data.format=prompt_completion): masking of prompts, whole-example packing, exactly-once coverage and
exact resume through the training loader, the eval loader, the chat template's cut of assistant turns."""

from __future__ import annotations

import pytest
import torch

from sft_helpers import chat_rows, examples_of, qa_rows, sft_cfg, write_rows
from tokenmill.data.chat_template import DEFAULT_TEMPLATE, ChatRenderer, Segment
from tokenmill.data.loader import build_loader
from tokenmill.data.quality import loader_problem_lines
from tokenmill.data.sft import SftPacker
from tokenmill.data.sft_source import example_document
from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError

TOK = Tokenizer.byte()
EOS = TOK.eos_id


def encoded(row: dict) -> tuple[list[int], list[int]]:
    """(all tokens, learned tokens) of a prompt/completion row, by hand: bytes, then EOS after the completion."""
    prompt, completion = TOK.encode(row["prompt"]), TOK.encode(row["completion"])
    return prompt + completion + [EOS], completion + [EOS]


def test_prompts_are_masked_and_completions_with_eos_are_learned(tmp_path):
    rows = qa_rows(40)
    data = str(write_rows(tmp_path / "qa.jsonl", rows))
    cfg = sft_cfg([data], seq_len=127, batch=2, shuffle=0, shuffle_documents=False)
    batch = next(iter(build_loader(cfg, TOK, "train")))
    assert set(batch) == {"tokens", "targets", "doc_ids"} and batch["targets"].shape == (2, 127)
    got = examples_of(batch)
    assert len(got) >= 3  # several examples share a window
    assert got == [encoded(row) for row in rows[: len(got)]]  # in order, whole, prompt tokens never learned


def test_packing_never_splits_an_example_and_two_ranks_read_each_once(tmp_path):
    rows = qa_rows(150, seed=3, max_words=12)  # 20..90 tokens each: several per window, some alone
    data = str(write_rows(tmp_path / "qa.jsonl", rows))
    cfg = sft_cfg([data], seq_len=95, batch=3, shuffle=4)
    seen = []
    for rank in range(2):
        for batch in build_loader(cfg, TOK, "train", rank, 2, epochs=1):
            pad = batch["targets"] == -100
            assert pad.any()  # room left in windows is padding, never the start of the next example
            seen += examples_of(batch)
    assert sorted(seen) == sorted(encoded(row) for row in rows)  # every example exactly once, whole


def test_truncation_and_dropped_examples_are_counted_and_warned(recwarn):
    window = 24
    packer = SftPacker(TOK, window)
    supply = iter(
        [
            example_document([Segment("p" * 5, False), Segment("c" * 40, True)], False),  # cut: keeps 18 learned
            example_document([Segment("p" * 30, False), Segment("c" * 3, True)], False),  # prompt fills it: dropped
            example_document([Segment("ab", False), Segment("cd", True)], False),
        ]
    )
    rows = []
    while (row := packer.next_window(lambda: next(supply, None))) is not None:
        rows.append(row)
    assert len(rows) == 2 and all(r.shape == (3, window) for r in rows)
    assert rows[0][1].ne(-100).sum().item() == window - 5  # the truncated example's learned tokens
    assert rows[1][0, :5].tolist() == TOK.encode("abcd") + [EOS]
    assert any("truncated" in str(w.message) for w in recwarn)
    stats = packer.stats()
    assert (stats["examples_truncated"], stats["examples_dropped"]) == (2, 1)
    (line,) = loader_problem_lines({**stats, "sources": {}})
    assert "2 of 3 SFT examples" in line and "1 of them dropped" in line


def test_resumed_loader_gives_the_same_next_batches(tmp_path):
    data = str(write_rows(tmp_path / "qa.jsonl", qa_rows(120, seed=5)))
    cfg = sft_cfg([data], seq_len=63, batch=2, shuffle=6)
    loader = build_loader(cfg, TOK, "train")
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(30)]  # past the end of the first epoch
    resumed = build_loader(cfg, TOK, "train")
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in expected:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_changed_chat_template_refuses_the_resume(tmp_path):
    data = str(write_rows(tmp_path / "chat.jsonl", chat_rows(30)))
    loader = build_loader(sft_cfg([data], seq_len=63, batch=2), TOK, "train")
    next(iter(loader))
    state = loader.state_dict()
    other = tmp_path / "other.jinja"
    other.write_text(DEFAULT_TEMPLATE.replace("Assistant: ", "Bot: "))
    resumed = build_loader(sft_cfg([data], template=str(other), seq_len=63, batch=2), TOK, "train")
    with pytest.raises(UserError, match="chat_template changed"):
        resumed.load_state_dict(state)


def test_the_eval_loader_masks_like_training(tmp_path):
    train = str(write_rows(tmp_path / "train.jsonl", qa_rows(20)))
    rows = qa_rows(30, seed=9)
    val = str(write_rows(tmp_path / "val.jsonl", rows))
    cfg = sft_cfg([train], seq_len=63, batch=2, eval_sources=[val])
    got = [example for batch in build_loader(cfg, TOK, "eval") for example in examples_of(batch)]
    assert got == [encoded(row) for row in rows[: len(got)]] and len(got) >= 25  # only the last window's rest is cut


def test_chat_turns_learn_the_assistant_text_and_its_eos(tmp_path):
    data = str(write_rows(tmp_path / "chat.jsonl", chat_rows(10)))
    cfg = sft_cfg([data], seq_len=127, batch=1, shuffle=0, shuffle_documents=False)
    (tokens, learned), *_ = examples_of(next(iter(build_loader(cfg, TOK, "train"))))
    first = chat_rows(10)[0]["messages"]
    renderer = ChatRenderer(DEFAULT_TEMPLATE, "default", TOK)
    whole = renderer.render(first, add_generation_prompt=False)
    assert TOK.decode(tokens) == whole
    answers = f"{first[1]['content']}<|eos|>{first[3]['content']}<|eos|>"
    assert TOK.decode(learned) == answers  # both assistant turns, each with the EOS that ends it; nothing else
    assert tokens.count(EOS) == 2  # the template's end of turn is the EOS id, and no second EOS is appended
    prompt = renderer.render(first[:1], add_generation_prompt=True)  # what a server feeds before the answer
    assert whole.startswith(prompt) and prompt.endswith("Assistant: ")


BAD_ROWS = [
    ({"prompt": "a"}, "line 2: missing field 'completion'"),
    ({"completion": "a"}, "line 2: missing field 'prompt'"),
    ({"prompt": 3, "completion": "a"}, "field 'prompt' holds int"),
    ({"prompt": "a", "completion": ""}, "'completion' is empty"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "message 1 has no 'content'"),
    (["prompt", "completion"], "line 2: is a JSON list"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_file_row_and_field(tmp_path, row, message):
    data = write_rows(tmp_path / "bad.jsonl", [qa_rows(1)[0], row, qa_rows(1)[0]])
    with pytest.raises(UserError) as err:
        build_loader(sft_cfg([str(data)]), TOK, "train")
    text = str(err.value)
    assert str(data) in text and message in text and "\n" not in text


def test_a_template_that_fails_to_render_names_the_row(tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    system = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}
    data = write_rows(tmp_path / "chat.jsonl", [chat_rows(1)[0], system])
    with pytest.raises(UserError, match=r"chat.jsonl line 2: the chat template .* \(no system role\)"):
        build_loader(sft_cfg([str(data)], template=str(template)), TOK, "train")


def test_bad_parquet_row_and_bad_json_and_other_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(UserError, match=r"rows.parquet row 2: missing field 'completion'"):
        build_loader(sft_cfg([str(tmp_path / "rows.parquet")]), TOK, "train")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"broken.jsonl line 2: not valid JSON"):
        build_loader(sft_cfg([str(tmp_path / "broken.jsonl")]), TOK, "train")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match="not .txt"):
        build_loader(sft_cfg([str(tmp_path / "notes.txt")]), TOK, "train")
    with pytest.raises(UserError, match="data.chat_template=none"):
        build_loader(sft_cfg([str(write_rows(tmp_path / "c.jsonl", chat_rows(2)))], template="none"), TOK, "train")

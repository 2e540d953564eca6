"""Reward functions (registry, weights, user functions, checks) and the built-in tasks (split, cursor, mcq file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tokenmill.errors import UserError
from tokenmill.finetune.config import TASK_NAMES, RLConfig
from tokenmill.finetune.rewards import REWARDS, build_rewards, parse_reward, score
from tokenmill.finetune.tasks import TASKS, build_task, read_mcq, write_sft_set

MCQ_FILE = Path(__file__).parent / "data" / "mcq_tiny.jsonl"


def test_task_names_in_config_equal_the_registry():
    assert sorted(TASK_NAMES) == sorted(TASKS)


def test_builtin_rewards_give_partial_credit_and_exact_match_with_eos():
    completions = ["abc", "abx", "abc", "xyz", "abcd"]
    answer = ["abc"] * 5
    finish = ["stop", "stop", "length", "stop", "stop"]
    fields = {"answer": answer, "finish_reason": finish}
    total, each = score(build_rewards(["position_match:0.5", "exact_eos:0.5"]), [""] * 5, completions, fields)
    assert each["position_match"] == pytest.approx([1, 2 / 3, 1, 0, 1])
    assert each["exact_eos"] == [1, 0, 0, 0, 0]  # cut off by the token limit, or extra text: not exact
    assert total == pytest.approx([1.0, 1 / 3, 0.5, 0.0, 0.5])


def test_mcq_letter_reads_the_first_standalone_option_letter():
    got = REWARDS["mcq_letter"]([""] * 4, ["B", " C. because", "I think A", "Bees"], answer=["B", "C", "B", "B"])
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_user_reward_by_module_function_and_weight(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
        "def skip(prompts, completions, **kw):\n    return [None for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = build_rewards(["my_rewards:length:0.5", "my_rewards:skip", "exact"])
    assert [(r.name, r.weight) for r in rewards] == [("my_rewards:length", 0.5), ("my_rewards:skip", 1.0), ("exact", 1)]
    total, each = score(rewards, ["p", "p"], ["abcd", "x"], {"answer": ["x", "x"]})
    assert total == [2.0, 1.5] and each["my_rewards:skip"] == [0.0, 0.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise ValueError('boom')", "raised ValueError: boom"),
        ("return [1.0]", "returned 1 values for 2 completions"),
        ("return 3.0", "returned float for 2 completions"),
        ("return ['x', 1.0]", "returned 'x'"),
        ("return [float('nan'), 1.0]", "returned nan"),
    ],
)
def test_a_broken_reward_is_one_clear_error(tmp_path, monkeypatch, body, message):
    (tmp_path / "bad_rewards.py").write_text(f"def bad(prompts, completions, **kw):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_rewards", None)
    with pytest.raises(UserError, match="reward function bad_rewards:bad") as err:
        score(build_rewards(["bad_rewards:bad"]), ["p", "p"], ["a", "b"], {"answer": ["a", "b"]})
    assert message in str(err.value) and "\n" not in str(err.value)
    sys.modules.pop("bad_rewards", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nope", "names no reward"), ("no_such_module_xyz:f", "cannot import module"), ("json:nothing", "no function")],
)
def test_unknown_rewards_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_reward(spec)


@pytest.mark.parametrize("name", ["copy", "reverse", "addition"])
def test_generated_tasks_split_by_prompt_and_cursor_walks_epochs(name):
    task = build_task(name, 0.1)
    train, held = {e.prompt for e in task.train}, {e.prompt for e in task.heldout}
    assert train and held and not train & held
    assert 0.05 < len(held) / (len(held) + len(train)) < 0.15
    epoch = [task.train_example(7, i).prompt for i in range(len(task.train))]
    assert sorted(epoch) == sorted(train)  # one epoch visits every training prompt once
    assert [task.train_example(7, i) for i in range(5)] == [task.train_example(7, i) for i in range(5)]
    assert epoch[:5] != [task.train_example(8, i).prompt for i in range(5)]  # the seed changes the order
    example = task.train[0]
    if name == "reverse":
        assert example.answer == example.prompt[:-1][::-1]
    if name == "addition":
        a, b = example.prompt[:-1].split("+")
        assert example.answer == str(int(a) + int(b))


def test_mcq_file_builds_prompts_with_letters():
    examples = read_mcq(str(MCQ_FILE))
    assert len(examples) == 12
    first = examples[2]
    assert first.prompt.startswith("Which is a colour?\nA. dog\nB. table\nC. red\nD. run\nAnswer:")
    assert first.answer == "C" and first.columns["options"]["C"] == "red"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "options": ["a", "b"]}', "lacks field(s) answer"),
        ('{"question": "q", "answer": "A"}', "lacks field(s) options"),
        ('{"question": "q", "options": ["a", "b"], "answer": "E"}', "is not one of the option letters"),
        ("not json", "is not valid JSON"),
        ('{"question": "q", "options": ["a"], "answer": "A"}', "at least 2 strings"),
    ],
)
def test_bad_mcq_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(MCQ_FILE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(UserError) as err:
        read_mcq(str(path))
    assert message in str(err.value)
    assert f"{path}:2" in str(err.value)


def test_sft_set_holds_training_prompts_only_and_never_overwrites(tmp_path):
    task = build_task("addition", 0.1)
    path = write_sft_set(task, tmp_path / "sft.jsonl", 300, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 300 and set(rows[0]) == {"prompt", "completion"}
    held = {e.prompt for e in task.heldout}
    assert not any(r["prompt"] in held for r in rows)
    a, b = rows[0]["prompt"][:-1].split("+")
    assert rows[0]["completion"] == str(int(a) + int(b))
    with pytest.raises(UserError, match="already exists"):
        write_sft_set(task, path, 10, seed=0)
    assert len(path.read_text().splitlines()) == 300


def test_config_refuses_group_size_one_and_mcq_without_file():
    from tokenmill.errors import ConfigError

    with pytest.raises(ConfigError, match="rl.group_size=1"):
        RLConfig(group_size=1).validate()
    with pytest.raises(ConfigError, match="rl.task_file"):
        RLConfig(task="mcq").validate()

"""`extends:` chains of presets and YAML files: precedence, relative paths, and one-line errors."""

from __future__ import annotations

import re

import pytest

from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.errors import ConfigError


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_file_extends_file_relative_to_itself_with_precedence(tmp_path):
    write(tmp_path / "base.yaml", "extends: tiny\ntrain: {seq_len: 64, micro_batch_size: 2}\noptim: {lr: 0.001}\n")
    child = write(tmp_path / "exp" / "a.yaml", "extends: ../base.yaml\ntrain: {micro_batch_size: 3}\n")
    cfg = load_config(file=child, overrides=["optim.lr=0.002"])
    assert cfg.model.n_layers == 4  # from the preset at the root of the chain
    assert cfg.train.seq_len == 64  # from the base file
    assert cfg.train.micro_batch_size == 3  # the extending file wins over its base
    assert cfg.optim.lr == 0.002  # overrides win over every file


def test_list_of_parents_merges_left_to_right(tmp_path):
    write(tmp_path / "one.yaml", "train: {seq_len: 32, micro_batch_size: 5}\n")
    write(tmp_path / "two.yaml", "train: {seq_len: 48}\n")
    child = write(tmp_path / "child.yaml", "extends: [tiny, one.yaml, two.yaml]\n")
    cfg = load_config(file=child)
    assert (cfg.train.seq_len, cfg.train.micro_batch_size, cfg.model.d_model) == (48, 5, 256)


def test_cycle_of_files_names_the_chain(tmp_path):
    write(tmp_path / "b.yaml", "extends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: b.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*b\.yaml -> .*c\.yaml -> .*b\.yaml"):
        load_config(file=tmp_path / "b.yaml")


@pytest.mark.parametrize(
    "body, message",
    [
        ("extends: missing.yaml\n", r"not found: .*missing\.yaml \(extended by .*child\.yaml\)"),
        ("extends: 5\n", r"extends=5 is not allowed"),
        ("extends: [tiny, 3]\n", r"is not allowed: name a preset, a YAML file"),
        ("extends: nosuchpreset\n", r"unknown preset 'nosuchpreset' \(extended by"),
    ],
)
def test_bad_extends_is_one_line(tmp_path, capsys, body, message):
    child = write(tmp_path / "child.yaml", body)
    before = child.read_bytes()
    assert main(["config", "show", str(child)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert child.read_bytes() == before


def test_config_file_problems_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfetrain: {}\n")
    (tmp_path / "folder").mkdir()
    for arg, message in ((tmp_path / "bad.yaml", "is not UTF-8"), (tmp_path / "folder", "is a directory")):
        assert main(["config", "show", str(arg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def test_empty_preset_list_is_refused(capsys):
    assert main(["config", "show", "--preset", ","]) == 2
    assert "names no preset" in capsys.readouterr().err

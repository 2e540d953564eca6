"""Config system: round trip, precedence, nested overrides and every error case of issue 2."""

from __future__ import annotations

import pytest
import yaml

from tokenmill.cli import main
from tokenmill.config import Config, config_from_dict, load_config, parse_override, preset_names, split_overrides
from tokenmill.errors import ConfigError


def test_defaults_validate_and_round_trip_through_yaml():
    cfg = load_config(["dense-180m"], overrides=["model.n_layers=2", "--optim.lr=1e-4"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.model.n_layers == 2 and again.optim.lr == pytest.approx(1e-4)


def test_every_preset_loads_and_round_trips():
    names = preset_names()
    assert {"tiny", "gpt2-124m", "dense-180m", "llama3-1b", "llama3.2-1b", "gpt2", "llama", "demo"} <= set(names)
    for name in names:
        cfg = load_config([name])
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_precedence_preset_then_file_then_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("model: {n_layers: 7, d_model: 512}\ntrain: {seq_len: 128}\n")
    cfg = load_config(["tiny"], file, ["model.n_layers=3"])
    assert cfg.model.n_layers == 3  # override beats file
    assert cfg.model.d_model == 512  # file beats preset (tiny has 256)
    assert cfg.model.n_kv_heads == 2  # preset beats defaults (default 0)
    assert cfg.train.seq_len == 128


def test_presets_combine_left_to_right_and_extends_chains():
    cfg = load_config(["llama-124m", "gpt2"])  # size from llama-124m, components from gpt2
    assert cfg.model.n_layers == 12 and cfg.model.norm == "layernorm" and cfg.model.position == "learned"
    assert load_config(["gpt2-124m"]).model.bias is True  # through `extends: gpt2`


def test_file_may_extend_a_preset(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("extends: dense-180m\nmodel: {n_layers: 2}\n")
    cfg = load_config(file=file)
    assert cfg.model.n_layers == 2 and cfg.model.qk_norm is True


def test_nested_override_values_are_typed():
    cfg = load_config(
        ["tiny"],
        overrides=[
            "optim.betas=[0.8, 0.99]",
            "train.total_tokens=1e6",
            "train.compile=true",
            "data.sources=[stdlib, x.jsonl:0.5]",
        ],
    )
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.train.total_tokens == 1_000_000 and isinstance(cfg.train.total_tokens, int)
    assert cfg.train.compile is True
    assert cfg.data.sources == ["stdlib", "x.jsonl:0.5"]


def test_override_forms():
    assert parse_override("--model.n_layers=8") == ("model.n_layers", 8)
    assert parse_override("model.n_layers=8") == ("model.n_layers", 8)
    assert split_overrides(["--model.n_layers", "8", "train.seq_len=64"]) == ["model.n_layers=8", "train.seq_len=64"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.n_layer=2", "unknown config key 'model.n_layer'; did you mean 'model.n_layers'?"),
        ("modle.n_layers=2", "did you mean 'model.n_layers'?"),
        ("model.n_layers=-1", "model.n_layers=-1 is not allowed: must be > 0"),
        ("model.n_layers=two", "model.n_layers='two' is not allowed: expected an integer"),
        ("model.n_heads=5", "model.n_heads=5 is not allowed: must divide model.d_model=256"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 is not allowed: model.n_heads=4 must be a multiple of it"),
        (
            "model.norm=batchnorm",
            "model.norm='batchnorm' is not allowed: choose one of layernorm, layernorm_nobias, rmsnorm",
        ),
        ("train.compile=maybe", "train.compile='maybe' is not allowed: expected true or false"),
        ("optim.lr=fast", "optim.lr='fast' is not allowed: expected a number"),
        ("model=3", "names a section, not a key"),
    ],
)
def test_bad_overrides_name_key_value_and_fix(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(["tiny"], overrides=[override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'dense-18m'; did you mean 'dense-180m'"):
        load_config(["dense-18m"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: {d_modle: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'model.d_model'"):
        load_config(file=unknown)


def test_cli_config_show_prints_loadable_yaml(capsys):
    assert main(["config", "show", "--preset", "dense-180m", "--model.n_layers=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_layers"] == 2
    assert config_from_dict(printed) == load_config(["dense-180m"], overrides=["model.n_layers=2"])


def test_cli_bad_override_is_one_line_exit_2(capsys):
    assert main(["config", "show", "--preset", "tiny", "--model.n_layer=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("error: unknown config key 'model.n_layer'")


def test_cli_debug_shows_traceback():
    with pytest.raises(ConfigError):
        main(["config", "show", "--debug", "--preset", "tiny", "--model.n_layer=2"])


def test_config_dataclass_defaults_are_independent():
    a, b = Config(), Config()
    a.eval.sample_prompts.append("x")
    assert "x" not in b.eval.sample_prompts


# ---------------------------------------------------------------------------------------------------------
# keys that moved to the eval and stability sections

MOVED = [
    ("train.eval_interval", "eval.interval_steps", 50),
    ("train.eval_batches", "eval.max_batches", 4),
    ("train.sample_prompts", "eval.sample_prompts", ["x"]),
    ("train.sample_tokens", "eval.sample_tokens", 8),
    ("train.nonfinite_policy", "stability.nonfinite_policy", "stop"),
    ("train.divergence_threshold", "stability.divergence_threshold", 2.0),
    ("train.divergence_fast_alpha", "stability.divergence_fast_alpha", 0.2),
    ("train.divergence_slow_alpha", "stability.divergence_slow_alpha", 0.02),
    ("train.divergence_warmup_steps", "stability.divergence_warmup_steps", 10),
]


@pytest.mark.parametrize("old, new, value", MOVED, ids=[m[0] for m in MOVED])
def test_moved_key_names_its_new_key_in_overrides_and_files(tmp_path, old, new, value):
    expected = f"{old} moved to {new}"
    with pytest.raises(ConfigError) as err:
        load_config(["tiny"], overrides=[f"{old}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    assert str(err.value) == expected
    section, key = old.split(".")
    file = tmp_path / "old.yaml"
    file.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError) as err:
        load_config(file=file)
    assert str(err.value) == expected
    # the new key takes the value
    new_section, new_key = new.split(".")
    assert getattr(getattr(load_config(overrides=[f"{new}={value}"]), new_section), new_key) == value


def test_no_shipped_preset_uses_a_moved_key():
    from tokenmill.config.loading import MOVED_KEYS, load_preset

    for name in preset_names():
        data = load_preset(name)
        used = {f"{section}.{key}" for section, keys in data.items() if isinstance(keys, dict) for key in keys}
        assert not used & set(MOVED_KEYS), (name, used & set(MOVED_KEYS))


def test_cli_moved_key_is_one_line(capsys):
    assert main(["config", "show", "--preset", "tiny", "--train.eval_interval=5"]) == 2
    assert capsys.readouterr().err == "error: train.eval_interval moved to eval.interval_steps\n"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.step_cadence=.inf", "train.step_cadence=inf is not allowed: must be a finite number > 0"),
        ("train.step_cadence=.nan", "train.step_cadence=nan is not allowed"),
        ("train.step_cadence=0", "train.step_cadence=0.0 is not allowed: must be > 0"),
        ("train.out_dir=", "train.out_dir='' is not allowed: name the run folder"),
        ("train.out_dir='  '", "train.out_dir='  ' is not allowed: name the run folder"),
        ("train.device=banana", "train.device='banana' is not allowed: choose auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:x", "train.device='cuda:x' is not allowed"),
        ("eval.max_batches=-1", "eval.max_batches=-1 is not allowed: must be >= 0"),
        ("log.interval_tokens=-5", "log.interval_tokens=-5 is not allowed: must be >= 0"),
        ("checkpoint.interval_tokens=-5", "checkpoint.interval_tokens=-5 is not allowed: must be >= 0"),
        ("stability.divergence_threshold=.inf", "stability.divergence_threshold=inf is not allowed"),
        ("stability.nonfinite_policy=ignore", "stability.nonfinite_policy='ignore' is not allowed: choose one of skip"),
    ],
)
def test_bad_train_eval_and_stability_values(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(["tiny"], overrides=[override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_good_device_names_pass():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_config(overrides=[f"train.device={device}"]).train.device == device

"""Config machinery: YAML load, presets and `extends:`, dotted overrides, typed coercion, suggestions.

Precedence, lowest first: section defaults < presets (in the order given) < config file < overrides.
Any YAML (preset or file) may say `extends:` with a preset name, a YAML file (relative to the extending file)
or a list of them; parents merge left to right, the extending file on top.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tokenmill.config.run import Config
from tokenmill.errors import ConfigError

# Keys that moved to another section: old YAML files, presets and overrides get one line naming the new key.
MOVED_KEYS: dict[str, str] = {
    "train.eval_interval": "eval.interval_steps",
    "train.eval_batches": "eval.max_batches",
    "train.sample_prompts": "eval.sample_prompts",
    "train.sample_tokens": "eval.sample_tokens",
    "train.nonfinite_policy": "stability.nonfinite_policy",
    "train.divergence_threshold": "stability.divergence_threshold",
    "train.divergence_fast_alpha": "stability.divergence_fast_alpha",
    "train.divergence_slow_alpha": "stability.divergence_slow_alpha",
    "train.divergence_warmup_steps": "stability.divergence_warmup_steps",
}


# ---------------------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    """Every preset shipped in the package (YAML files under tokenmill/presets)."""
    folder = resources.files("tokenmill.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(err, 'problem', err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    return data


def load_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a preset, with its `extends` chain applied."""
    path = resources.files("tokenmill.config") / "presets" / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(preset_names())}"
        chain = f" (extended by {' -> '.join(seen)})" if seen else ""
        raise ConfigError(f"unknown preset '{name}'{chain}{hint}")
    return _expand_extends(_read_yaml(path.read_text(), f"preset {name}"), seen + (name,), base_dir=None)


def load_file(path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a user config file, with its `extends` chain applied."""
    path = Path(path)
    chain = f" (extended by {' -> '.join(seen)})" if seen else ""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory{chain}: pass a YAML file (or use --preset)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{chain} (pass an existing YAML file or use --preset)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    return _expand_extends(_read_yaml(text, str(path)), seen + (str(path.resolve()),), base_dir=path.resolve().parent)


def _is_file_reference(parent: str) -> bool:
    """`extends:` entries ending in .yaml/.yml or containing a path separator name files; others name presets."""
    return parent.endswith((".yaml", ".yml")) or "/" in parent or "\\" in parent


def _expand_extends(data: dict[str, Any], seen: tuple[str, ...], base_dir: Path | None) -> dict[str, Any]:
    """Merge the parents named by `extends:` (presets or YAML files, left to right), then `data` on top.

    File paths are relative to the extending file; `seen` is the chain so far (cycles and errors name it).
    """
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    if isinstance(parents, str):
        parents = [parents]
    where = seen[-1] if seen else "config"
    if not isinstance(parents, list) or not all(isinstance(p, str) and p.strip() for p in parents):
        raise ConfigError(
            f"{where}: extends={parents!r} is not allowed: name a preset, a YAML file, or a list of "
            f"them (e.g. extends: [tiny, base.yaml])"
        )
    merged: dict[str, Any] = {}
    for parent in parents:
        if _is_file_reference(parent):
            if base_dir is None:
                raise ConfigError(f"{where}: a shipped preset cannot extend the file '{parent}'")
            target = str((base_dir / parent).resolve())
            if target in seen:
                raise ConfigError(f"config file '{parent}' extends itself (cycle: {' -> '.join(seen + (target,))})")
            merged = deep_merge(merged, load_file(target, seen))
        else:
            if parent in seen:
                raise ConfigError(f"preset '{parent}' extends itself (cycle: {' -> '.join(seen + (parent,))})")
            merged = deep_merge(merged, load_preset(parent, seen))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Typed construction from mappings


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, candidates: list[str]) -> ConfigError:
    if key in MOVED_KEYS:
        return ConfigError(f"{key} moved to {MOVED_KEYS[key]}")
    leaf = key.rsplit(".", 1)[-1]
    moved = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]  # right name, other section: train.lr
    close = moved[:1] or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (used for suggestions and help)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _field_map(cls):
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            keys.extend(all_keys(hints[name], dotted + "."))
        else:
            keys.append(dotted)
    return keys


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared type, or raise a ConfigError naming key and value."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a mapping of {hint.__name__} fields")
        return build_section(hint, value, key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a list, e.g. [a, b]")
        (item,) = typing.get_args(hint)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a mapping, e.g. {{a: 1}}")
        _, item = typing.get_args(hint)
        return {str(k): coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}={value!r} is not allowed: expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}={value!r} is not allowed: expected an integer (e.g. 8, 1e9, 1_000_000)")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not allowed: expected a number (e.g. 3e-4)")
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false (on/yes/true) as booleans: `train.fp8=off`
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not allowed: expected a string")
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A section dataclass from a (partial) mapping; unknown keys suggest the closest valid key."""
    fields = _field_map(cls)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, all_keys(cls, f"{prefix}." if prefix else ""))
        values[name] = coerce(value, hints[name], key)
    return cls(**values)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from a nested mapping (as printed by `config show`)."""
    sections = _field_map(Config)
    for name, value in data.items():
        if name not in sections:
            raise _unknown_key(str(name), list(sections))
        if not isinstance(value, dict):
            raise ConfigError(f"section '{name}' must be a mapping of keys, got {value!r}")
    return build_section(Config, data, "").validate()


# ---------------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`--a.b=1`, `a.b=1` -> ("a.b", 1); the value is parsed as YAML (lists, numbers, booleans)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"cannot read override '{text}': write it as --section.key=value (e.g. --model.n_layers=8)")
    key, raw = body.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set a dotted key in a nested mapping, refusing keys the config does not have."""
    known = all_keys()
    if key not in known:
        prefix_ok = any(k.startswith(key + ".") for k in known)
        if prefix_ok:
            raise ConfigError(
                f"override '{key}' names a section, not a key; set one of its keys, e.g. "
                f"{next(k for k in known if k.startswith(key + '.'))}=..."
            )
        raise _unknown_key(key, known)
    parts = key.split(".")
    out = deep_merge(data, {})
    node = out
    for part in parts[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value
    return out


def load_config(
    presets: list[str] | None = None, file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Resolve presets, a config file and dotted overrides into one validated Config."""
    data: dict[str, Any] = {}
    for name in presets or []:
        data = deep_merge(data, load_preset(name))
    if file is not None:
        data = deep_merge(data, load_file(file))
    for text in overrides or []:
        key, value = parse_override(text)
        data = apply_override(data, key, value)
    return config_from_dict(data)


def split_overrides(extras: list[str]) -> list[str]:
    """Normalise leftover CLI words into `key=value` overrides (`--a.b 3` becomes `a.b=3`)."""
    out: list[str] = []
    i = 0
    while i < len(extras):
        word = extras[i]
        body = word[2:] if word.startswith("--") else word
        if "=" in body:
            out.append(body)
        elif word.startswith("--") and "." in body and i + 1 < len(extras) and not extras[i + 1].startswith("--"):
            out.append(f"{body}={extras[i + 1]}")
            i += 1
        else:
            raise ConfigError(
                f"unrecognised argument '{word}': overrides look like --section.key=value "
                f"(see `tokenmill config show` for every key)"
            )
        i += 1
    return out


def field_help(key: str) -> str:
    """The one-line help text of a dotted key."""
    section, name = key.split(".", 1)
    cls = typing.get_type_hints(Config)[section]
    return _field_map(cls)[name].metadata.get("help", "")

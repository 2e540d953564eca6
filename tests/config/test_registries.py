"""Every registry maps exactly the choice names its config section validates against, and `--help` lists them.

The names live in each package's `config.py` (no torch), the code in a registry dict beside the code it builds;
this test is what keeps the two in step when a variant is added.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest

from tokenmill.config import Config
from tokenmill.model import config as model_config
from tokenmill.optim import config as optim_config
from tokenmill.parallel import config as parallel_config

# (module holding the registry, registry name, the config's tuple of names, the config key choosing from it)
REGISTRIES = [
    ("tokenmill.model.norms", "NORMS", model_config.NORM_NAMES, "model.norm"),
    ("tokenmill.model.transformer", "NORM_POSITIONS", model_config.NORM_POSITION_NAMES, "model.norm_position"),
    ("tokenmill.model.position", "POSITIONS", model_config.POSITION_NAMES, "model.position"),
    ("tokenmill.model.ffn", "FFNS", model_config.FFN_NAMES, "model.ffn"),
    ("tokenmill.model.ffn", "ACTIVATIONS", model_config.ACTIVATION_NAMES, "model.activation"),
    ("tokenmill.model.attention", "ATTENTION", model_config.ATTENTION_NAMES, "model.attention"),
    ("tokenmill.model.init", "INITS", model_config.INIT_NAMES, "model.init"),
    ("tokenmill.optim.optimizers", "OPTIMIZERS", optim_config.OPTIMIZER_NAMES, "optim.name"),
    ("tokenmill.optim.schedules", "SCHEDULES", optim_config.SCHEDULE_NAMES, "schedule.name"),
    ("tokenmill.parallel.pipeline", "PP_SCHEDULES", parallel_config.PP_SCHEDULE_NAMES, "parallel.pp_schedule"),
    ("tokenmill.parallel.data_parallel", "FSDP_DTYPES", parallel_config.FSDP_DTYPE_NAMES, "parallel.fsdp_param_dtype"),
]


def help_of(key: str) -> str:
    """The help text a dotted config key's dataclass field carries (what `--help` shows for it)."""
    section, name = key.split(".")
    fields = {field.name: field for field in dataclasses.fields(typing.get_type_hints(Config)[section])}
    return fields[name].metadata["help"]


IDS = [f"{module.rsplit('.', 1)[1]}.{registry}" for module, registry, _, _ in REGISTRIES]


@pytest.mark.parametrize(("module", "registry", "names", "key"), REGISTRIES, ids=IDS)
def test_registry_keys_equal_the_config_names(module, registry, names, key):
    table = getattr(importlib.import_module(module), registry)
    assert len(set(names)) == len(names), f"{names} repeats a name"
    assert set(table) == set(names), f"{module}.{registry} and the names {key} is validated against differ"


@pytest.mark.parametrize(("module", "registry", "names", "key"), REGISTRIES, ids=IDS)
def test_help_of_each_choice_key_lists_every_name(module, registry, names, key):
    help_text = help_of(key)
    missing = [name for name in names if name not in help_text]
    assert not missing, f"the help of {key} ({help_text!r}) does not mention {missing}"

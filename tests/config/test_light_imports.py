"""Config and `--help` stay light: no torch import (it costs seconds), and `train --help` documents every key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.cli import main
from tokenmill.config import all_keys

LOADED = "loaded module: "


def imported_modules(code: str) -> set[str]:
    """Every module a fresh `python -X importtime -c CODE` imports.

    importtime's report (one stderr line per module) is what a person reads to find the culprit, but it skips
    modules loaded through `importlib.import_module` (the lazy `__getattr__`s do that), so `sys.modules` at exit
    is read too.
    """
    dump = f"import atexit, sys; atexit.register(lambda: print(*('{LOADED}' + m for m in sys.modules), sep='\\n'))\n"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", dump + code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    loaded = [line[len(LOADED) :] for line in proc.stdout.splitlines() if line.startswith(LOADED)]
    return set(reported[1:]) | set(loaded)  # reported[0] is importtime's column header


def as_main(*argv: str) -> str:
    """Code that runs `python -m tokenmill ARGV`."""
    return f"import runpy; sys.argv = {['tokenmill', *argv]!r}; runpy.run_module('tokenmill', run_name='__main__')"


# (code, a module it must import: proves the modules were read and the path was exercised)
LIGHT_COMMANDS = {
    "help": (as_main("--help"), "tokenmill.cli"),
    "train-help": (as_main("train", "--help"), "tokenmill.cli.train"),
    "config-help": (as_main("config", "--help"), "tokenmill.cli.config"),
    "import-config": ("import tokenmill.config", "tokenmill.config"),
    "load-and-validate": ("from tokenmill.config import load_config; load_config(['tiny'])", "tokenmill.model.config"),
}


@pytest.mark.parametrize(("code", "expected"), LIGHT_COMMANDS.values(), ids=LIGHT_COMMANDS.keys())
def test_no_torch_is_imported(code, expected):
    modules = imported_modules(code)
    assert expected in modules
    heavy = sorted(name for name in modules if name == "torch" or name.startswith("torch."))
    assert not heavy, f"{code} imports {heavy[:5]}"


def test_train_help_lists_every_config_key_with_its_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one help entry per line, so texts can be found whole
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    keys = all_keys()
    assert len(keys) > 50
    missing = [key for key in keys if f"--{key} " not in out]
    assert not missing, f"`tokenmill train --help` lacks {missing}"
    for section in {key.split(".")[0] for key in keys}:
        assert f"{section} section" in out
    assert "normalisation layer (NORMS): layernorm, layernorm_nobias, rmsnorm (default: 'rmsnorm')" in out

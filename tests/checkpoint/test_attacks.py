"""No code runs from a checkpoint: pickle payloads in DCP's `.metadata` are refused by every reader.

Three attacks, each against `tokenmill train --resume`, `tokenmill checkpoint consolidate`,
`tokenmill.load_model` and `tokenmill.load_tokenizer`:
  unlisted  - a `.metadata` payload dropped into an untouched single-file checkpoint;
  replaced  - the `.metadata` of a real sharded checkpoint replaced by a payload, manifest recomputed;
  returning - the same, but the payload also returns the genuine metadata, so a reader that ran it would
              carry on as if nothing happened.
The payload creates a marker file when unpickled: it must never appear. Each test ends by unpickling the
payload with plain pickle, which does create the marker, so a test cannot pass because the payload is inert.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch

import tokenmill
from tokenmill.checkpoint.folder import write_manifest
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.checkpoint.parts import ModelState
from tokenmill.cli import main
from tokenmill.errors import UserError
from train_helpers import cli_args, one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)

ATTACKS = ("unlisted", "replaced", "returning")
READERS = ("resume", "consolidate", "load_model", "load_tokenizer")
STEP = 1


class Payload:
    """Unpickles to `eval(expression)`: what a malicious `.metadata` does under a plain pickle.load."""

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def __reduce__(self):
        return eval, (self.expression,)


def payload_bytes(marker: Path, genuine: bytes | None = None) -> bytes:
    touch = f"open({str(marker)!r}, 'w').close()"
    if genuine is None:
        return pickle.dumps(Payload(touch))
    return pickle.dumps(Payload(f"({touch}, __import__('pickle').loads({genuine!r}))[1]"))


def make_checkpoint(root: Path, sharded: bool) -> Path:
    """A checkpoint of the tiny run (byte tokenizer) at step STEP, as `train` would resume it."""
    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.model import build_model
    from tokenmill.optim.optimizers import build_optimizer
    from tokenmill.optim.schedules import build_scheduler
    from tokenmill.train.loop import resolve_model_vocab
    from tokenmill.train.state import TrainState

    cfg = resolve_model_vocab(tiny_config(root, 2 * STEP), Tokenizer.byte())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, 2 * STEP, 128)  # sets the groups' initial_lr, as a run does
    parts = {
        "model": ModelState(model, sharded=sharded),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "train": TrainState(step=STEP, tokens_seen=STEP * 128),
    }
    return Checkpointer(root, cfg.checkpoint, parts, run_config=cfg).save(STEP)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genuine")
    return {
        "single": make_checkpoint(root / "single", sharded=False),
        "sharded": make_checkpoint(root / "sharded", sharded=True),
    }


def attacked(genuine: dict[str, Path], tmp_path: Path, attack: str) -> tuple[Path, Path]:
    """(checkpoint folder carrying the attack, marker path) in a copy of a genuine run."""
    import shutil

    marker = tmp_path / "pwned"
    kind = "single" if attack == "unlisted" else "sharded"
    run = tmp_path / "victim"
    shutil.copytree(genuine[kind].parent.parent, run)
    folder = run / "checkpoints" / genuine[kind].name
    metadata = folder / ".metadata"
    if attack == "unlisted":
        metadata.write_bytes(payload_bytes(marker))
    else:
        metadata.write_bytes(payload_bytes(marker, metadata.read_bytes() if attack == "returning" else None))
        write_manifest(folder, STEP)  # the attacker recomputes the manifest: checksums alone cannot help
    return folder, marker


def read_with(reader: str, folder: Path, tmp_path: Path, capsys) -> None:
    """Read `folder` as `reader` does; every attack must end in a one-line error, or (load_tokenizer on a
    sharded folder) in a result that never touched `.metadata`."""
    if reader == "resume":
        assert main([*cli_args(tmp_path / "resumed", 2 * STEP), "--resume", str(folder)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    elif reader == "consolidate":
        out = tmp_path / "merged.safetensors"
        assert main(["checkpoint", "consolidate", str(folder), str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()
    elif reader == "load_model":
        with pytest.raises(UserError):
            tokenmill.load_model(folder)
    else:
        with contextlib.suppress(UserError):  # the unlisted file fails verification; a sharded folder loads
            assert tokenmill.load_tokenizer(folder).name == "byte"  # config.yaml + tokenizer, never .metadata


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("attack", ATTACKS)
def test_no_code_runs_from_a_checkpoint(genuine, tmp_path, capsys, attack, reader):
    folder, marker = attacked(genuine, tmp_path, attack)
    read_with(reader, folder, tmp_path, capsys)
    assert not marker.exists(), f"{attack} payload ran through {reader}"
    # the payload is live: plain pickle (what torch's FileSystemReader.read_metadata uses) runs it
    result = pickle.loads((folder / ".metadata").read_bytes())
    assert marker.exists()
    if attack == "returning":
        from torch.distributed.checkpoint.metadata import Metadata

        assert isinstance(result, Metadata)


def test_the_genuine_checkpoints_are_read_by_the_same_paths(genuine, tmp_path, capsys):
    """Without the payloads, resume and consolidate succeed: the attacks above reach the readers they target."""
    assert main([*cli_args(tmp_path / "resumed", 2 * STEP), "--resume", str(genuine["sharded"])]) == 0
    assert main(["checkpoint", "consolidate", str(genuine["sharded"]), str(tmp_path / "merged.safetensors")]) == 0
    assert tokenmill.load_model(genuine["single"]) is not None
    assert tokenmill.load_tokenizer(genuine["sharded"]).name == "byte"
    capsys.readouterr()


def test_metadata_pointing_outside_the_folder_is_refused(genuine, tmp_path):
    """DCP metadata names the shard files to read; one that points elsewhere is refused before any read."""
    import shutil

    from tokenmill.checkpoint.sharded import read_dcp_metadata

    folder = tmp_path / "ckpt"
    shutil.copytree(genuine["sharded"], folder)
    metadata = read_dcp_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match="not a file of"):
        read_dcp_metadata(folder)

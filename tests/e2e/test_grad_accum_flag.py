"""`--grad-accum N` becomes `train.grad_accum`; values below 1 are refused in one line before anything runs."""

from __future__ import annotations

import pytest

from tokenmill.cli import main


@pytest.mark.parametrize(
    "value, message", [("0", "--grad-accum 0 is not allowed"), ("-1", "train.grad_accum=-1 is not allowed")]
)
def test_grad_accum_below_one_is_one_line(tmp_path, capsys, value, message):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--grad-accum", value, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()

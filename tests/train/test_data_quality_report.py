"""A training run reports the documents its loader could not read as text, once, at the end."""

from __future__ import annotations

import json

from tokenmill.cli import main
from train_helpers import cli_args, events, one_thread  # noqa: F401 (one_thread: autouse)


def test_documents_without_text_are_reported_at_the_end_of_train(tmp_path):
    source = tmp_path / "docs.jsonl"
    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 20} for i in range(60)]
    rows += [{"text": None}] * 30  # a third of the documents lost their text
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(cli_args(out, 3, f"data.sources=[{source}]", "data.eval_fraction=0.0")) == 0
    warnings = [e["message"] for e in events(out, "warning")]
    lost = [m for m in warnings if "had no text" in m]
    assert len(lost) == 1 and str(source) in lost[0], warnings

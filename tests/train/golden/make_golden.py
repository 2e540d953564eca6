"""Regenerate tests/train/golden/tiny_cpu_fp32.json, the golden loss curve checked by tests/train/test_train.py.

    OMP_NUM_THREADS=1 .venv/bin/python tests/train/golden/make_golden.py

Run it only when a numeric change is intended (new init, optimizer fix, ...), and say why in the commit:
the golden test exists to catch changes nobody meant to make. The run is `train_helpers.golden_overrides`:
the tiny preset shrunk to 2 x 64, byte tokenizer, a fixed LCG-generated corpus, fp32, 20 steps, one thread.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "tiny_cpu_fp32.json"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python tests/train/golden/make_golden.py"


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1]))  # tests/ (train_helpers)
    import torch

    from train_helpers import golden_run

    with tempfile.TemporaryDirectory() as tmp:
        curve = golden_run(tmp)
    if curve["status"] != "completed":
        print(f"golden run ended {curve['status']}; not writing", file=sys.stderr)
        return 1
    record = {
        "regenerate": COMMAND,
        **curve,
        "recorded": {
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
        },
    }
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}: loss {curve['losses'][0]:.4f} -> {curve['losses'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

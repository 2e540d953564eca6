"""The state conventions every data loader follows, so a checkpoint's data position means the same thing for all.

A loader state is a plain dict (tensors and primitives, loadable with `torch.load(weights_only=True)`):

    {"format": STATE_FORMAT, "kind": "text" | "shards" | "eval", "identity": {...}, "layout": {...}, ...payload}

- `identity`: what decides *which* data the stream holds (sources, tokenizer, seed, split, ...). A change is
  refused with one line naming the key: resuming would silently train on other data.
- `layout`: how the stream is cut over ranks, workers and batches. The same layout resumes exactly (the next
  batches are the ones the uninterrupted loader would have given); another layout resumes from the furthest
  position any rank reached, so no document of the epoch is seen twice, and a warning says the resume is not
  batch-exact.
"""

from __future__ import annotations

import warnings
from typing import Any

from tokenmill.errors import UserError

STATE_FORMAT = 2


def make_state(kind: str, identity: dict[str, Any], layout: dict[str, Any], **payload: Any) -> dict[str, Any]:
    """A loader state in the shared envelope; `payload` is the loader's own position data."""
    return {"format": STATE_FORMAT, "kind": kind, "identity": dict(identity), "layout": dict(layout), **payload}


def same_layout(state: dict[str, Any], kind: str, identity: dict[str, Any], layout: dict[str, Any]) -> bool:
    """Check a state against this loader: raise on another format, kind or identity; warn and return False on
    another layout (the caller then resumes without repeats instead of exactly)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"data loader state has format {found!r}, expected {STATE_FORMAT}: it was written by another "
            f"tokenmill version; resume without the data position (start a new run from the weights)"
        )
    if state.get("kind") != kind:
        raise UserError(
            f"cannot resume the data stream: the checkpoint holds a {state.get('kind')!r} loader state "
            f"but data.sources now gives a {kind!r} loader; resume with the checkpoint's data settings"
        )
    old = state.get("identity", {})
    changed = [k for k in identity if old.get(k) != identity[k]]
    if changed:
        k = changed[0]
        raise UserError(
            f"cannot resume the data stream: {k} changed ({old.get(k)!r} -> {identity[k]!r}); resume "
            f"with the data settings of the checkpoint"
        )
    old_layout = state.get("layout", {})
    if old_layout == layout:
        return True
    diff = ", ".join(f"{k} {old_layout.get(k)}->{v}" for k, v in layout.items() if old_layout.get(k) != v)
    warnings.warn(
        f"data: resuming on a different layout ({diff}): no document is repeated, but the resume is not "
        f"batch-exact (buffered windows are skipped)",
        stacklevel=3,
    )
    return False

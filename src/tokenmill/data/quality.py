"""Documents that lose text on the way in: a null or non-text field, an empty text, undecodable bytes.

Such documents are skipped (or keep U+FFFD in place of the bytes) rather than stopping a long run, but never
silently: every reader counts them per source, the counts travel in the loader state (so they survive a
resume), and `problem_lines` turns them into the lines that `train` (at its end), `data check` and `prepare`
print, as a warning when more than WARN_SHARE of a source's documents are affected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

WARN_SHARE = 0.01  # above this share of a source's documents, a note becomes a warning


@dataclass
class DocCounts:
    """Per-source counts of the documents a reader saw."""

    read: int = 0  # documents that reached the reader, kept or skipped
    null: int = 0  # text field null or not a string: skipped
    empty: int = 0  # empty text: skipped (blank lines of a .txt file land here)
    replaced_docs: int = 0  # kept documents holding U+FFFD (bytes that were not valid UTF-8)
    replaced_chars: int = 0  # U+FFFD characters in those documents
    scanned: int = 0  # documents pulled from the source, other slots' documents that were passed over included
    scanned_bytes: int = 0  # UTF-8 bytes of their text: the cost of reading this slot's share

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> DocCounts:
        state = state or {}
        return cls(**{f.name: int(state.get(f.name, 0)) for f in fields(cls)})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: DocCounts) -> DocCounts:
        return DocCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def add_counts(per_source: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Sum two {source name: counts} maps (e.g. the slots of a rank, or the simulated ranks of `data check`)."""
    out = {name: dict(counts) for name, counts in per_source.items()}
    for name, counts in more.items():
        out[name] = (DocCounts.from_dict(out.get(name)) + DocCounts.from_dict(counts)).to_dict()
    return out


def problem_lines(per_source: dict[str, dict[str, int]]) -> list[str]:
    """One line per source and kind of problem (none when the data is clean): 'warning: ...' above WARN_SHARE."""
    lines = []
    for name, raw in per_source.items():
        counts = DocCounts.from_dict(raw)
        total = max(counts.read, 1)
        for n, what in (
            (counts.null, "had no text (null or not a string in the text field) and were skipped"),
            (
                counts.replaced_docs,
                f"held bytes that are not valid UTF-8, replaced by {counts.replaced_chars:,} U+FFFD characters",
            ),
        ):
            if n:
                level = "warning" if n / total > WARN_SHARE else "note"
                lines.append(
                    f"{level}: data source {name}: {n:,} of {counts.read:,} documents read ({n / total:.1%}) {what}"
                )
    return lines


def loader_problem_lines(stats: dict[str, Any]) -> list[str]:
    """The problem lines of a loader's `stats()`: what it counted while reading, else what `prepare` recorded;
    for SFT data also the examples that did not fit a window."""
    lines = problem_lines(stats.get("sources") or stats.get("prepared") or {})
    truncated, dropped = stats.get("examples_truncated", 0), stats.get("examples_dropped", 0)
    if truncated:
        lines.append(
            f"warning: {truncated:,} of {stats.get('documents', 0):,} SFT examples read were longer than "
            f"train.seq_len + 1 tokens and were truncated ({dropped:,} of them dropped: their prompt filled the "
            f"window); raise train.seq_len to keep them whole"
        )
    return lines

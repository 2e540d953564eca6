"""Code text is self-contained: no comment, docstring or name points at a document that does not ship with the repo.

A reader of a clone has only the repository (and public sources: papers, docs URLs). References to design notes,
spec entries, seed documents or tracker issues that live elsewhere send them nowhere; the rule itself belongs in the
text, in one clause.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "benchmarks")

# name -> pattern of a reference to a document outside the repository
OUTSIDE_REFERENCES = {
    "spec entry": re.compile(r"\bSPEC\b|\((?:[ACDMOPT]\d{1,2}(?:, ?|-)?)+\)|\bthe [ACDMOPT]\d{1,2}\b"),
    "style-guide rule": re.compile(r"\bSTYLE rule\b"),
    "seed document": re.compile(r"\bseeds? 0\d\d\b", re.IGNORECASE),
    "research or notes file": re.compile(r"\b(research|notes)/|\buser_needs\b|\bperf_anchors\b"),
    "tracker issue": re.compile(r"\bissues? #?\d+\b", re.IGNORECASE),
    "name of a spec entry": re.compile(r"\b[A-Z]\d+_[A-Z_]+\b"),
}


def scanned_files() -> list[Path]:
    return sorted(
        path
        for folder in SCANNED
        for path in (ROOT / folder).rglob("*")
        # build metadata (an editable install writes src/*.egg-info, a copy of the README) is not source
        if path.is_file() and "__pycache__" not in path.parts and not any(p.endswith(".egg-info") for p in path.parts)
    )


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, line, what it refers to) for each line that refers to a document outside the repository."""
    return [
        (number, line.strip(), what)
        for number, line in enumerate(text.splitlines(), start=1)
        for what, pattern in OUTSIDE_REFERENCES.items()
        if pattern.search(line)
    ]


@pytest.mark.parametrize(
    "line",
    [
        '"""Optimizer registry (SPEC T2)."""',
        "Data-parallel wrappers: DDP (P1), ZeRO-1 (P2)",
        "Checkpoints (C1-C5): save, verify, load",
        "Computes the O2 metrics at each log step",
        "# the data section (SPEC D)",
        "Plain PyTorch (STYLE rule 1): parallelism is applied outside.",
        "lr x sqrt(batch) (Seed 004's rule)",
        "Conventions (shared/research/perf_anchors.md)",
        "exactly where it stopped (user_needs #2/#3).",
        "Data pipeline throughput (issue 3 benchmark).",
        "O2_FIELDS = ('loss', 'lr')",
    ],
)
def test_each_kind_of_outside_reference_is_caught(line):
    assert offending_lines(line)


@pytest.mark.parametrize(
    "line",
    [
        "SPECIAL_TOKENS = (EOS, BOS, PAD)",
        "the warning cites pytorch/pytorch#135712",
        "weights = share of documents (docs/data.md)",
        "DeepNorm (arXiv:2203.00555): beta = (8L)^(-1/4)",
        "seed: int = opt(1337, 'seed for model init')",
        "STEP_METRICS = ('loss', 'lr')",
        "GPU peaks (H100, A100) in dense TFLOPS; fp8 is E4M3",
    ],
)
def test_in_repo_and_public_references_pass(line):
    assert not offending_lines(line)


def test_no_text_in_src_refers_to_a_document_outside_the_repository():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {what}: {line}"
        for path in scanned_files()
        for number, line, what in offending_lines(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, "state the rule in a clause or cite the public source instead of:\n" + "\n".join(found)

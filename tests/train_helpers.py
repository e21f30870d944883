"""Driving `python -m agent.train` in-process and reading what its stages write (tests/test_train_*.py,
tests/test_synth_script.py)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """A stage's manifest or report: one JSON object a line, blank lines skipped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_cli(*argv: str, quiet: bool = True) -> None:
    """One `python -m agent.train ARGV` run (with --quiet unless told otherwise) that must succeed."""
    from agent.train.__main__ import main

    args = [*argv, "--quiet"] if quiet else [*argv]
    assert main(args) == 0, argv


def run_stage(*argv: str) -> dict:
    """One stage through the CLI entry, quietly; returns the summary.json it wrote in its --out."""
    train_cli(*argv)
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())

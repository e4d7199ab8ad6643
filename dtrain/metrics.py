"""Metric names, and the two ways of reading them back: the run directory's metrics.jsonl, and byte figures
formatted for people.

Every metric name the trainer writes is a constant here; the report, the benchmarks and the tests import
them, so a name is spelled once. docs/outputs.md lists them: a public interface (add, do not rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), like the link rates bytes are divided by: '118 kB', '1.34 MB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of a run directory's metrics.jsonl, in order ([] when there is none yet). A last line cut short
    by a crash is skipped: every complete line before it is returned."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows

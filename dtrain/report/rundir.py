"""Reading run directories written by `dtrain train` (and `dtrain sweep`).

A run directory holds config.yaml, metrics.jsonl and, once the run has finished, summary.json. A sweep also
leaves sweep.json (the grid point, including a shaped link rate if it had one) and train.log. A directory
without a usable summary is an incomplete run: it is returned as skipped with the reason, never raised.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import ConfigError, EXACT_STRATEGIES

# Any one of these files marks a directory as a run directory (a crashed run may hold only some of them).
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "train.log")
# Directories that live inside runs or reports and are never runs themselves (wandb's files/ has a config.yaml).
_NOT_RUNS = {"wandb", "checkpoints"}

_NON_FINITE = ("nan", "inf", "-inf")
REQUIRED_SUMMARY_KEYS = (
    "task", "strategy", "comm_rank", "seed", "world_size", "steps",
    "final/val_acc", "comm/bytes_per_step", "comm/wire_bytes_per_step", "comm/allreduce_bytes_per_step",
    "comm/time_per_step_s", "time/step_s_mean", "time/compute_s_per_step",
)


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    link_rate: Optional[str]  # the shaped link the run was measured on (sweep.json), None for the local link

    @property
    def task(self) -> str:
        return str(self.summary["task"])

    @property
    def strategy(self) -> str:
        return str(self.summary["strategy"])

    @property
    def rank(self) -> Optional[int]:
        """The compression rank, None for exact strategies (where comm.rank has no effect)."""
        return None if self.strategy in EXACT_STRATEGIES else int(self.summary["comm_rank"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    @property
    def world_size(self) -> int:
        return int(self.summary["world_size"])


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


class IncompleteRun(Exception):
    """The directory is not a finished run; the message says why."""


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run directory or a directory with run directories somewhere below it (a sweep's out)."""
    found: list[Path] = []
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise ConfigError(f"run directory not found: {root}")
        below = _walk(root)
        if not below:
            raise ConfigError(f"no run directories in {root} (a run directory holds one of {', '.join(RUN_MARKERS)})")
        found.extend(d for d in below if d not in found)
    return found


def _walk(directory: Path) -> list[Path]:
    if is_run_dir(directory):
        return [directory]  # runs do not nest: checkpoints/ and wandb/ inside a run are not runs
    runs: list[Path] = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir() and p.name not in _NOT_RUNS):
        runs.extend(_walk(child))
    return runs


def load_run(path: Path) -> Run:
    if not (path / "summary.json").is_file():
        raise IncompleteRun("no summary.json (the run did not finish)")
    summary = _read_json(path / "summary.json")
    missing = [key for key in REQUIRED_SUMMARY_KEYS if key not in summary]
    if missing:
        raise IncompleteRun(f"summary.json lacks {', '.join(missing)}")
    train_rows, eval_rows = _read_metrics(path / "metrics.jsonl")
    sweep_point = _read_json(path / "sweep.json") if (path / "sweep.json").is_file() else {}
    return Run(path, summary, train_rows, eval_rows, sweep_point.get("link_rate"))


def load_runs(paths: Iterable[Path]) -> tuple[list[Run], list[Skipped]]:
    runs: list[Run] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except IncompleteRun as why:
            skipped.append(Skipped(path, str(why)))
    return runs, skipped


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise IncompleteRun(f"{file.name} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise IncompleteRun(f"{file.name} is not a JSON object")
    return _restore_non_finite(data)


def _restore_non_finite(row: dict[str, Any]) -> dict[str, Any]:
    """The trainer writes NaN and ±Inf as the strings 'nan', 'inf', '-inf' (JSON has no such numbers)."""
    return {key: float(value) if value in _NON_FINITE else value for key, value in row.items()}


def _read_metrics(file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows (with train/loss) and evaluation rows (with val/acc), in file order."""
    if not file.is_file():
        raise IncompleteRun("no metrics.jsonl")
    train_rows: list[dict[str, Any]] = []
    eval_rows: list[dict[str, Any]] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _restore_non_finite(json.loads(line))
        except json.JSONDecodeError:
            raise IncompleteRun(f"metrics.jsonl line {number} is not valid JSON") from None
        if "train/loss" in row:
            train_rows.append(row)
        elif "val/acc" in row:
            eval_rows.append(row)
    if not eval_rows:
        raise IncompleteRun("metrics.jsonl has no evaluation rows")
    return train_rows, eval_rows

"""Reading run directories written by `dtrain train` (and `dtrain sweep`).

A run directory holds config.yaml, metrics.jsonl and, once the run has finished, summary.json. A sweep also
leaves sweep.json (the grid point, including a shaped link rate if it had one) and train.log. A directory
without a usable summary is an incomplete run: it is returned as skipped with the reason, never raised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics
from ..config import EXACT_STRATEGIES, ConfigError
from ..metrics import METRICS_FILE, SUMMARY_FILE, MetricsLineError, read_metrics

# Any one of these files marks a directory as a run directory (a crashed run may hold only some of them).
RUN_MARKERS = ("config.yaml", METRICS_FILE, SUMMARY_FILE, "train.log")
# Directories that live inside runs or reports and are never runs themselves (wandb's files/ has a config.yaml).
_NOT_RUNS = {"wandb", "checkpoints"}

_NON_FINITE = ("nan", "inf", "-inf")
REQUIRED_SUMMARY_KEYS = (
    metrics.TASK,
    metrics.STRATEGY,
    metrics.COMM_RANK,
    metrics.SEED,
    metrics.WORLD_SIZE,
    metrics.STEPS,
    metrics.FINAL_VAL_ACC,
    metrics.COMM_BYTES_PER_STEP,
    metrics.COMM_WIRE_BYTES_PER_STEP,
    metrics.COMM_ALLREDUCE_BYTES_PER_STEP,
    metrics.COMM_TIME_PER_STEP_S,
    metrics.TIME_STEP_S_MEAN,
    metrics.TIME_COMPUTE_S_PER_STEP,
)


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    link_rate: str | None  # the shaped link the run was measured on (sweep.json), None for the local link

    @property
    def task(self) -> str:
        return str(self.summary[metrics.TASK])

    @property
    def strategy(self) -> str:
        return str(self.summary[metrics.STRATEGY])

    @property
    def rank(self) -> int | None:
        """The compression rank, None for exact strategies (where comm.rank has no effect)."""
        return None if self.strategy in EXACT_STRATEGIES else int(self.summary[metrics.COMM_RANK])

    @property
    def seed(self) -> int:
        return int(self.summary[metrics.SEED])

    @property
    def world_size(self) -> int:
        return int(self.summary[metrics.WORLD_SIZE])


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
    if not (path / SUMMARY_FILE).is_file():
        raise IncompleteRun(f"no {SUMMARY_FILE} (the run did not finish)")
    summary = _read_json(path / SUMMARY_FILE)
    missing = [key for key in REQUIRED_SUMMARY_KEYS if key not in summary]
    if missing:
        raise IncompleteRun(f"{SUMMARY_FILE} lacks {', '.join(missing)}")
    train_rows, eval_rows = _read_metrics(path)
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


def _read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows (with train/loss) and evaluation rows (with val/acc), in file order."""
    if not (run_dir / METRICS_FILE).is_file():
        raise IncompleteRun(f"no {METRICS_FILE}")
    try:
        rows = [_restore_non_finite(row) for row in read_metrics(run_dir)]
    except MetricsLineError as err:
        raise IncompleteRun(str(err)) from None
    train_rows = [row for row in rows if metrics.TRAIN_LOSS in row]
    eval_rows = [row for row in rows if metrics.TRAIN_LOSS not in row and metrics.VAL_ACC in row]
    if not eval_rows:
        raise IncompleteRun(f"{METRICS_FILE} has no evaluation rows")
    return train_rows, eval_rows

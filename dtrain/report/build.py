"""Building a report: run directories in, report.md + plots (+ an offline wandb run) out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .document import write_report
from .plots import make_plots
from .rundir import Skipped, find_run_dirs, load_runs
from .table import TaskTable, build_tables
from .timemodel import LinkRate


@dataclass(frozen=True)
class Report:
    path: Path  # report.md
    tables: list[TaskTable]
    skipped: list[Skipped]
    wandb_dir: Path | None  # the offline wandb run, None when not logged


def make_report(
    run_dirs: list[str], out: Path, target_acc: float | None, rates: list[LinkRate], log_wandb: bool
) -> Report:
    if target_acc is not None and not 0.0 < target_acc <= 1.0:
        raise ConfigError(f"--target-acc {target_acc}: expected a fraction in (0, 1]")
    runs, skipped = load_runs(find_run_dirs(run_dirs))
    if not runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped)
        raise ConfigError(f"no complete runs to report ({reasons})")
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, target_acc, rates)
    plots = {table.task: make_plots(table, rates, out) for table in tables}
    path = write_report(out, tables, plots, rates, len(runs), skipped)
    wandb_dir = None
    if log_wandb:
        from .wandb_log import log_report  # importing wandb takes a while; only pay for it when logging

        wandb_dir = log_report(tables, rates, out)
    return Report(path, tables, skipped, wandb_dir)

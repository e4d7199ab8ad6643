"""The report's table and a bytes-vs-accuracy scatter, logged to an offline wandb run.

Each report is its own wandb run of job type "report" with its files under the report's out directory;
`wandb sync <dir>` uploads it later if wanted. Reports never talk to the network themselves.
"""

from __future__ import annotations

from pathlib import Path

import wandb

from .plots import token_iterations_by_difficulty
from .table import TaskTable, records
from .timemodel import LinkRate

PROJECT = "dtrain"
#: FPSA iterations per token by per-token difficulty (fixed sequence length), one row per (configuration, difficulty)
TOKEN_ITERS_KEY = "report/fpsa_token_iters_by_difficulty"


def log_report(tables: list[TaskTable], rates: list[LinkRate], out: Path) -> Path:
    """Log the tables to an offline wandb run under `out` and return the run's directory."""
    columns, data = records(tables, rates)
    run = wandb.init(
        project=PROJECT,
        dir=str(out),
        mode="offline",
        job_type="report",
        name=f"report-{out.name}",
        config={"target_acc": {t.task: t.target_acc for t in tables}, "link_rates": [rate.label for rate in rates]},
        settings=wandb.Settings(silent=True),
    )
    try:
        table = wandb.Table(columns=columns, data=data)
        logged = {
            "report/table": table,
            "report/bytes_vs_accuracy": wandb.plot.scatter(
                table,
                "payload_bytes_per_step",
                "final_acc_mean",
                title="payload bytes per step vs final validation accuracy",
            ),
        }
        # the per-token plot's points: iterations per token by per-token difficulty, per configuration
        token_rows = [
            [t.task, row.label, d, iters]
            for t in tables
            for row in t.rows
            for d, iters in token_iterations_by_difficulty(row).items()
        ]
        if token_rows:
            logged[TOKEN_ITERS_KEY] = wandb.Table(
                columns=["task", "configuration", "token_difficulty", "iterations"], data=token_rows
            )
        run.log(logged)
        return Path(run.dir).parent
    finally:
        run.finish()

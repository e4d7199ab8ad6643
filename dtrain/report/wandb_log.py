"""The report's table and a bytes-vs-accuracy scatter, logged to an offline wandb run.

Each report is its own wandb run of job type "report" with its files under the report's out directory;
`wandb sync <dir>` uploads it later if wanted. Reports never talk to the network themselves.
"""

from __future__ import annotations

from pathlib import Path

import wandb

from .table import TaskTable, records
from .timemodel import LinkRate

PROJECT = "dtrain"


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
        run.log(
            {
                "report/table": table,
                "report/bytes_vs_accuracy": wandb.plot.scatter(
                    table,
                    "payload_bytes_per_step",
                    "final_acc_mean",
                    title="payload bytes per step vs final validation accuracy",
                ),
            }
        )
        return Path(run.dir).parent
    finally:
        run.finish()

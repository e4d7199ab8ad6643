"""wandb logging on rank 0 (offline by default: no network; `disabled` writes nothing).

The offline run lives under the run directory (`<run dir>/wandb/offline-run-*`). Other ranks never import wandb.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .metrics import BYTES_VS_ACCURACY, COMM_BYTES_CUM, STEP, TRAIN_PREFIX, VAL_ACC, VAL_PREFIX


class Tracker:
    def __init__(self, mode: str, run_dir: Path, project: str, name: str, config: dict[str, Any], active: bool) -> None:
        self.run = None
        self._points: list[tuple[int, float, float]] = []  # (step, comm/bytes_cum, val/acc)
        if not active or mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: rank > 0 and disabled runs never pay for it

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True, x_disable_machine_info=True),
        )
        # val/acc against communication: the plot this project exists for.
        self.run.define_metric(COMM_BYTES_CUM)
        self.run.define_metric(f"{VAL_PREFIX}*", step_metric=COMM_BYTES_CUM)
        self.run.define_metric(f"{TRAIN_PREFIX}*", step_metric=STEP)

    def log(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        self.run.log(row)
        if VAL_ACC in row:
            self._points.append((int(row[STEP]), float(row.get(COMM_BYTES_CUM, 0)), float(row[VAL_ACC])))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        if self._points:
            table = self._wandb.Table(columns=[STEP, COMM_BYTES_CUM, VAL_ACC], data=self._points)
            self.run.log({BYTES_VS_ACCURACY: table})
        if summary:
            for k, v in summary.items():
                if isinstance(v, (int, float, str, bool)):
                    self.run.summary[k] = v
        self.run.finish()
        self.run = None

"""wandb logging on rank 0 (offline by default: no network; `disabled` writes nothing).

The offline run lives under the run directory (`<run dir>/wandb/offline-run-*`). Other ranks never import wandb.
A dict in a row or in the summary (fpsa/iters_by_token_difficulty, ...) becomes one scalar per key,
`<name>/<key>`; the final fpsa/iters_by_token_difficulty is also logged as a table (TOKEN_ITERS_TABLE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .metrics import (
    BYTES_VS_ACCURACY,
    COMM_BYTES_CUM,
    STEP,
    TOKEN_ITERS_BY_DIFFICULTY,
    TOKEN_ITERS_TABLE,
    TRAIN_PREFIX,
    VAL_ACC,
    VAL_PREFIX,
)


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with every dict value spread into scalars named `<name>/<key>`."""
    flat: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{name}/{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


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
        self.run.log(flatten(row))
        if VAL_ACC in row:
            self._points.append((int(row[STEP]), float(row.get(COMM_BYTES_CUM, 0)), float(row[VAL_ACC])))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        if self._points:
            table = self._wandb.Table(columns=[STEP, COMM_BYTES_CUM, VAL_ACC], data=self._points)
            self.run.log({BYTES_VS_ACCURACY: table})
        by_token = (summary or {}).get(TOKEN_ITERS_BY_DIFFICULTY)
        if by_token:
            table = self._wandb.Table(
                columns=["token_difficulty", "iterations"], data=[[float(d), float(i)] for d, i in by_token.items()]
            )
            self.run.log({TOKEN_ITERS_TABLE: table})
        if summary:
            for k, v in flatten(summary).items():
                if isinstance(v, (int, float, str, bool)):
                    self.run.summary[k] = v
        self.run.finish()
        self.run = None

"""dtrain.tracking: what reaches the offline wandb run (the launched-run check is tests/distributed/test_wandb.py)."""

from __future__ import annotations

from pathlib import Path

from dtrain import metrics
from dtrain.tracking import Tracker, flatten
from tests.helpers.wandb_files import written


def test_dicts_become_one_scalar_per_key():
    row = {metrics.STEP: 3, metrics.TOKEN_ITERS_BY_DIFFICULTY: {"0": 2.0, "4": 3.5}, metrics.VAL_ACC: 0.5}
    assert flatten(row) == {
        metrics.STEP: 3,
        f"{metrics.TOKEN_ITERS_BY_DIFFICULTY}/0": 2.0,
        f"{metrics.TOKEN_ITERS_BY_DIFFICULTY}/4": 3.5,
        metrics.VAL_ACC: 0.5,
    }


def test_the_offline_run_holds_the_per_token_iteration_metrics(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker("offline", tmp_path, "dtrain-test", "tokens", {}, active=True)
    by_token = {"0": 2.0, "1": 2.75, "2": 3.5}
    tracker.log(
        {
            metrics.STEP: 6,
            metrics.VAL_ACC: 0.5,
            metrics.COMM_BYTES_CUM: 100,
            metrics.VAL_TOKEN_ITERS_SLOPE: 0.75,
            metrics.TOKEN_ITERS_BY_DIFFICULTY: by_token,
        }
    )
    tracker.finish({metrics.FINAL_TOKEN_ITERS_SLOPE: 0.75, metrics.TOKEN_ITERS_BY_DIFFICULTY: by_token})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    keys = [
        metrics.VAL_TOKEN_ITERS_SLOPE,
        metrics.FINAL_TOKEN_ITERS_SLOPE,
        f"{metrics.TOKEN_ITERS_BY_DIFFICULTY}/2",
        metrics.TOKEN_ITERS_TABLE,
    ]
    assert written(run_file, keys) == []

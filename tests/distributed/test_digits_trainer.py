"""digits end to end on 2 gloo ranks (torchrun): configs/digits.yaml learns real images. A short run must be far
above chance (0.1); the full config must reach the documented >= 95% (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain import metrics as metric
from tests.helpers.launch import ROOT, summary, train

DIGITS = str(ROOT / "configs" / "digits.yaml")
QUIET = ("log.wandb=disabled", "log.progress=false", "checkpoint.every=0")


def test_short_digits_run_learns(tmp_path: Path):
    run = tmp_path / "run"
    train(run, "train.steps=200", "eval.every=0", *QUIET, nproc=2, config=DIGITS, timeout=180)
    s = summary(run)
    assert s[metric.WORLD_SIZE] == 2 and s[metric.STEPS] == 200
    assert s[metric.FINAL_VAL_ACC] >= 0.7


@pytest.mark.slow
def test_digits_config_reaches_95_percent_and_rankdad_stays_within_a_point(tmp_path: Path):
    """The acceptance figure, as docs/data.md measures it: means over seeds 0 and 1 (one seed moves by a point)."""
    acc = {}
    for strategy in ("allreduce", "rankdad"):
        for seed in (0, 1):
            run = tmp_path / f"{strategy}-{seed}"
            train(run, f"comm.strategy={strategy}", f"train.seed={seed}", *QUIET, nproc=2, config=DIGITS, timeout=600)
            acc[strategy, seed] = summary(run)[metric.FINAL_VAL_ACC]
    allreduce = (acc["allreduce", 0] + acc["allreduce", 1]) / 2
    rankdad = (acc["rankdad", 0] + acc["rankdad", 1]) / 2
    assert allreduce >= 0.95 and rankdad >= allreduce - 0.01, acc

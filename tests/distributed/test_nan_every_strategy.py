"""One NaN step on one rank costs exactly that step, whatever the strategy: no strategy's memory (error feedback,
warm starts, torch's PowerSGD hook state) carries the NaN into the steps after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.compression.registry import STRATEGY_NAMES
from dtrain.metrics import SKIPPED, SKIPPED_STEPS, STEP, TRAIN_LOSS
from tests.helpers.launch import metrics, summary, train

pytestmark = pytest.mark.faults


# every strategy, rank-dAD's all-reduce form (its own codec, its own memory) and its 8-bit sums (int8 would round
# a NaN to a finite 0 if the block's scale did not keep it)
VARIANTS = {name: (f"comm.strategy={name}",) for name in STRATEGY_NAMES}
VARIANTS["rankdad-allreduce"] = ("comm.strategy=rankdad", "comm.rankdad_mode=allreduce")
VARIANTS["rankdad-allreduce-int8"] = (*VARIANTS["rankdad-allreduce"], "comm.factor_dtype=int8", "comm.rest_dtype=int8")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_nan_on_rank_1_at_step_4_skips_exactly_that_step_on_every_rank(tmp_path: Path, variant: str):
    run = tmp_path / variant
    # PowerSGD compresses from step 3 (start_step 2), so the NaN meets its residuals and warm starts
    proc = train(
        run,
        *VARIANTS[variant],
        "train.steps=10",
        "train.consistency_every=1",
        "comm.rank=2",
        nproc=2,
        extra_env={"DTRAIN_FAULT": "nan@loss:step=4,rank=1"},
    )
    assert "all ranks skip this update" in proc.stderr
    rows = {r[STEP]: r for r in metrics(run) if TRAIN_LOSS in r}
    assert [s for s, r in sorted(rows.items()) if r[SKIPPED]] == [4]
    assert summary(run)[SKIPPED_STEPS] == 1  # and consistency_every=1 proved the replicas stayed identical

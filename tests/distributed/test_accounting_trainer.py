"""Byte accounting on real ranks: every control collective's payload is counted (comm/control_bytes, charged
to the step it happens in), and summary.json carries the payload and wire ratios against fp32 all-reduce."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dtrain import metrics as metric
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.model import build_model
from tests.helpers.launch import TINY, metrics, summary, train
from tests.helpers.ranks import run_ranks

FLAGS = 24  # the per-step all-reduce: float64 (loss, non-finite flag, non-finite loss flag)
AGREE = 4  # the start-up all_ranks_agree (int32)
RESUME = 8 + len(pickle.dumps(("ok", False)))  # rank 0's answer to "is this a restarted worker?" (run_on_main)


def _counted_gather(rank: int, world: int) -> dict:
    from dtrain.distributed import all_gather_objects, all_reduce_sum, broadcast_, take_control_bytes

    take_control_bytes()
    objs = [{"rank": r, "rows": torch.zeros(3 * r + 1, 4)} for r in range(world)]
    gathered = all_gather_objects(objs[rank])
    gather_bytes = take_control_bytes()
    all_reduce_sum(torch.zeros(3, dtype=torch.float64))
    broadcast_(torch.zeros(1, dtype=torch.int64), src=0)
    return {
        "gathered": [(g["rank"], g["rows"].shape[0]) for g in gathered],
        "gather_bytes": gather_bytes,
        "largest": max(len(pickle.dumps(o)) for o in objs),
        "reduce_and_broadcast": take_control_bytes(),
    }


def test_control_collectives_count_their_payload():
    for res in run_ranks(_counted_gather, 2):
        assert res["gathered"] == [(0, 1), (1, 4)]
        assert res["gather_bytes"] == 8 + res["largest"]  # the sizes, then every pickle padded to the largest
        assert res["reduce_and_broadcast"] == 3 * 8 + 8


def _param_tensors() -> int:
    cfg = load_config(TINY)
    return len(list(build_model(cfg, build_task(cfg.data).spec).parameters()))


def test_training_rows_carry_the_control_bytes_of_their_step(tmp_path: Path):
    run = tmp_path / "run"
    train(run, "train.consistency_every=2", nproc=2)
    rows = [r for r in metrics(run) if metric.TRAIN_LOSS in r]
    control = {r[metric.STEP]: r[metric.COMM_CONTROL_BYTES] for r in rows}
    replicas = 2 * 8 * _param_tensors()  # MAX and MIN of one int64 checksum per parameter
    assert control[1] == AGREE + RESUME + FLAGS
    assert control[2] == FLAGS + replicas
    # the step-3 checkpoint is charged to the next row: every rank agrees after each of its three phases
    # (prepare, write, publish: one all_ranks_agree each)
    assert control[4] == FLAGS + replicas + 3 * AGREE
    assert control[5] == FLAGS
    assert control[3] > FLAGS + 24 + 8  # evaluation: 3 float64 sums, the pickled sizes, the per-example rows
    assert control[6] > FLAGS + replicas + 24 + 8
    s = summary(run)
    # the final checkpoint's three agreements come after the last row: in the summary's total, in no row
    assert s[metric.COMM_CONTROL_BYTES_PER_STEP] == pytest.approx((sum(control.values()) + 3 * AGREE) / 6)


@pytest.mark.parametrize("strategy, world", [("allreduce", 2), ("rankdad", 2), ("rankdad", 1)])
def test_summary_payload_and_wire_ratios(tmp_path: Path, strategy: str, world: int):
    run = tmp_path / "run"
    proc = train(run, f"comm.strategy={strategy}", nproc=world)
    s = summary(run)
    assert s[metric.COMM_PAYLOAD_RATIO] == s[metric.COMPRESSION_RATIO]
    assert s[metric.COMPRESSION_RATIO] == pytest.approx(
        s[metric.COMM_ALLREDUCE_BYTES_PER_STEP] / s[metric.COMM_BYTES_PER_STEP]
    )
    ring = 2 * (world - 1) / world * 4 * s[metric.PARAMS]
    assert s[metric.COMM_ALLREDUCE_WIRE_BYTES_PER_STEP] == pytest.approx(ring)
    closing = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: done")][-1]
    if world == 1:
        assert s[metric.COMM_WIRE_RATIO] is None and "world size 1" in closing
        return
    assert s[metric.COMM_WIRE_RATIO] == pytest.approx(ring / s[metric.COMM_WIRE_BYTES_PER_STEP])
    if strategy == "allreduce":
        assert s[metric.COMM_WIRE_RATIO] == pytest.approx(1.0)
        assert "as many wire bytes as fp32 ring all-reduce at world size 2" in closing
    else:
        assert metric.describe_wire_ratio(s[metric.COMM_WIRE_RATIO], 2) in closing
        assert "wire bytes than fp32 ring all-reduce at world size 2" in closing

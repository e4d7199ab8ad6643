"""Byte accounting without a process group: the control-byte counter, the wire ratio against fp32 ring
all-reduce at the run's world size, and the report's wire column and headline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dtrain import distributed
from dtrain import metrics as metric
from dtrain.metrics import describe_wire_ratio, ring_allreduce_wire_bytes, wire_ratio
from dtrain.report.build import make_report
from dtrain.report.timemodel import parse_link_rates


def test_control_bytes_are_counted_only_when_something_is_sent():
    distributed.take_control_bytes()
    distributed.all_reduce_sum(torch.zeros(4, dtype=torch.float64))  # world size 1: the identity, nothing sent
    distributed.broadcast_(torch.zeros(2))
    distributed.all_gather_objects({"a": 1})
    assert distributed.take_control_bytes() == 0
    distributed.count_control_bytes(6984)  # e.g. DeepSpeed ZeRO-1's all-gather, counted from its sizes
    distributed.count_control_bytes(16)
    assert distributed.take_control_bytes() == 7000
    assert distributed.take_control_bytes() == 0


def test_wire_ratio_against_ring_all_reduce_at_the_same_world_size():
    assert ring_allreduce_wire_bytes(1000, 1) == 0.0
    assert ring_allreduce_wire_bytes(1000, 2) == 1000.0
    assert ring_allreduce_wire_bytes(1000, 4) == 1500.0
    assert wire_ratio(1500.0, 300.0) == 5.0
    assert wire_ratio(0.0, 0.0) is None  # one rank: nothing crosses a link on either side
    assert math.isinf(wire_ratio(1500.0, 0.0))
    assert describe_wire_ratio(12.34, 4) == "12.3x fewer wire bytes than fp32 ring all-reduce at world size 4"
    assert describe_wire_ratio(1.02, 2) == "as many wire bytes as fp32 ring all-reduce at world size 2"
    assert describe_wire_ratio(0.5, 2) == "2.0x MORE wire bytes than fp32 ring all-reduce at world size 2"
    # a job that re-formed at world size 1 after steps at 2: the reference has no wire bytes, the run had some
    assert wire_ratio(0.0, 10.0) == 0.0
    assert describe_wire_ratio(0.0, 1) == "wire bytes where fp32 ring all-reduce at world size 1 has none"
    assert "world size 1" in describe_wire_ratio(None, 1)


def _run(path: Path, strategy: str, world: int, payload: float, wire: float, acc: float) -> None:
    path.mkdir(parents=True)
    rows = [{metric.STEP: s, metric.TRAIN_LOSS: 1.0, metric.COMM_BYTES_SENT: payload} for s in (1, 2)]
    rows.append({metric.STEP: 2, metric.VAL_LOSS: 1.0, metric.VAL_ACC: acc, metric.COMM_BYTES_CUM: 2 * payload})
    (path / metric.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        metric.TASK: "s5",
        metric.STRATEGY: strategy,
        metric.COMM_RANK: 2,
        metric.SEED: 0,
        metric.WORLD_SIZE: world,
        metric.STEPS: 2,
        metric.FINAL_VAL_ACC: acc,
        metric.COMM_BYTES_PER_STEP: payload,
        metric.COMM_WIRE_BYTES_PER_STEP: wire,
        metric.COMM_ALLREDUCE_BYTES_PER_STEP: 1000.0,
        metric.COMM_TIME_PER_STEP_S: 0.01,
        metric.TIME_STEP_S_MEAN: 0.1,
        metric.TIME_COMPUTE_S_PER_STEP: 0.09,
    }  # no comm/wire_ratio: a run written before it existed gets its ratio from the byte figures
    (path / metric.SUMMARY_FILE).write_text(json.dumps(summary))


def test_report_quotes_the_wire_ratio_with_its_world_size(tmp_path: Path):
    # at S=4 an all-gather of 200 B payload puts 600 B on the wire; fp32 ring all-reduce puts 1500 B
    _run(tmp_path / "runs" / "allreduce-w4", "allreduce", 4, 1000.0, 1500.0, 0.80)
    _run(tmp_path / "runs" / "rankdad-w4", "rankdad", 4, 200.0, 600.0, 0.78)
    _run(tmp_path / "runs" / "rankdad-w1", "rankdad", 1, 200.0, 0.0, 0.70)
    report = make_report(
        [str(tmp_path / "runs")], tmp_path / "out", None, parse_link_rates(["10mbit"]), log_wandb=False
    )
    rows = {(r.strategy, r.world_size): r for r in report.tables[0].rows}
    assert rows[("rankdad", 4)].compression_ratio == 5.0 and rows[("rankdad", 4)].wire_ratio == 2.5
    assert rows[("allreduce", 4)].wire_ratio == 1.0 and rows[("rankdad", 1)].wire_ratio is None
    text = report.path.read_text()
    assert (
        "**rankdad r2 S=4: 2.5x fewer wire bytes than fp32 ring all-reduce at world size 4** "
        "(payload 5.00× fewer than fp32 all-reduce), final val acc 0.7800 against 0.8000 for allreduce." in text
    )
    assert "| wire ratio vs fp32 ring all-reduce |" in text and "| 5.00× | 2.50× |" in text
    assert "| 5.00× | — |" in text  # world size 1: no wire ratio

"""dtrain.metrics: the one metrics.jsonl reader, the byte formatter, and the protocol through which a model
reports its own statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtrain import metrics
from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.metrics import (
    MetricsLineError,
    ReportsStatistics,
    example_iterations,
    format_bytes,
    read_metrics,
    step_statistics,
)
from dtrain.model import build_model
from dtrain.report.rundir import IncompleteRun, _read_metrics
from dtrain.rundir import RunDir

SPEC = TaskSpec(name="t", vocab_size=7, seq_len=6, num_classes=3, per_token=False, targets_per_example=1, pad_id=None)


def test_format_bytes_uses_decimal_units():
    assert [format_bytes(n) for n in (0, 999, 1000, 118_880, 1.34e6, 2.5e9, 3e12)] == [
        "0 B",
        "999 B",
        "1 kB",
        "119 kB",
        "1.34 MB",
        "2.5 GB",
        "3 TB",
    ]


def test_read_metrics_skips_only_a_last_line_cut_short(tmp_path: Path):
    assert read_metrics(tmp_path) == []
    rows = [{metrics.STEP: 1, metrics.TRAIN_LOSS: 0.5}, {metrics.STEP: 1, metrics.VAL_ACC: "nan"}]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / metrics.METRICS_FILE).write_text(text + '{"step": 2, "train/lo')  # killed mid-write
    assert read_metrics(tmp_path) == rows
    (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1\n' + text)
    with pytest.raises(MetricsLineError, match="metrics.jsonl line 1 is not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(IncompleteRun, match="^metrics.jsonl line 1 is not valid JSON$"):  # the report's one line
        _read_metrics(tmp_path)


def test_resume_keeps_the_rows_up_to_the_checkpoint_byte_for_byte(tmp_path: Path):
    rows = [
        {metrics.STEP: s, metrics.TRAIN_LOSS: 1 / 3 + s, metrics.GRAD_NORM: float("nan"), metrics.SKIPPED: False}
        for s in range(1, 5)
    ]
    written = RunDir(tmp_path, active=True)
    written.open(Config(), resume=False)
    for row in rows:
        written.log(row)
    before = (tmp_path / metrics.METRICS_FILE).read_text().splitlines(keepends=True)
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 5, "tra')  # the crash
    written.truncate_metrics_after(2)
    written.close()
    assert (tmp_path / metrics.METRICS_FILE).read_text() == "".join(before[:2])


def _model(attention: str) -> torch.nn.Module:
    cfg = Config.model_validate({"model": {"attention": attention, "d_model": 8, "n_layers": 2, "n_heads": 2}})
    torch.manual_seed(0)
    return build_model(cfg, SPEC)


def test_the_self_transformer_reports_its_statistics_through_the_protocol():
    tokens = torch.randint(0, 7, (4, 6))
    fpsa, vanilla = _model("fpsa"), _model("vanilla")
    for model in (fpsa, vanilla):
        assert isinstance(model, ReportsStatistics)
        model(tokens)
    assert step_statistics(fpsa) == fpsa.fpsa_stats() and metrics.FPSA_ITERS_MEAN in step_statistics(fpsa)
    assert torch.equal(example_iterations(fpsa), fpsa.fpsa_example_iters().float() / 2)  # mean over 2 layers
    assert step_statistics(vanilla) == {} and example_iterations(vanilla) is None


def test_a_model_without_the_protocol_reports_nothing():
    plain = torch.nn.Linear(2, 2)
    assert not isinstance(plain, ReportsStatistics)
    assert step_statistics(plain) == {} and example_iterations(plain) is None

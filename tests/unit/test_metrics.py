"""dtrain.metrics: the one metrics.jsonl reader, the byte formatter, and the protocol through which a model
reports its own statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dtrain import metrics
from dtrain.config import Config
from dtrain.data import TaskSpec, build_task
from dtrain.distributed import DistEnv
from dtrain.metrics import (
    MetricsLineError,
    ReportsStatistics,
    ReportsTokenIterations,
    example_iterations,
    format_bytes,
    least_squares_slope,
    read_metrics,
    step_statistics,
    token_iterations,
)
from dtrain.model import build_model
from dtrain.report.rundir import IncompleteRun, _read_metrics
from dtrain.rundir import RunDir
from dtrain.trainer import evaluate

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
    assert not isinstance(plain, ReportsTokenIterations) and token_iterations(plain) is None


def test_token_iterations_are_the_mean_over_layers_of_each_tokens_count():
    tokens = torch.randint(0, 7, (4, 6))
    fpsa, vanilla = _model("fpsa"), _model("vanilla")
    assert token_iterations(fpsa) is None  # no forward yet
    for model in (fpsa, vanilla):
        model(tokens)
    counts = [layer.last_solve.token_iters for layer in fpsa.fpsa_layers()]
    assert torch.equal(token_iterations(fpsa), (counts[0] + counts[1]).double() / 2)
    assert token_iterations(vanilla) is None


def test_least_squares_slope_of_grouped_points_is_the_slope_of_the_points():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (500,), generator=gen).double()
    y = 2.0 + 0.75 * x + torch.randn(500, generator=gen, dtype=torch.float64)
    counts = torch.bincount(x.long(), minlength=9).double()
    sums = torch.bincount(x.long(), y, minlength=9)
    expected = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), y[:, None]).solution[1, 0].item()
    assert least_squares_slope(range(9), counts.tolist(), sums.tolist()) == pytest.approx(expected, rel=1e-12)
    assert 0.6 < expected < 0.9
    # an exact line, and the undefined cases: no points, one distinct x
    assert least_squares_slope([0, 1, 2], [1, 2, 1], [1.0, 2 * 3.0, 5.0]) == pytest.approx(2.0)
    assert math.isnan(least_squares_slope([0, 1], [0, 0], [0.0, 0.0]))
    assert math.isnan(least_squares_slope([0, 3], [0, 5], [0.0, 10.0]))


def _tiny_eval_setup(task: str, batch_size: int) -> tuple[Config, object, torch.nn.Module]:
    cfg = Config.model_validate(
        {
            "model": {"d_model": 8, "n_layers": 2, "n_heads": 2},
            "fpsa": {"max_iter": 12, "tol": 1e-4, "damping": 1.0},
            "data": {"task": task, "seq_len": 10, "n_val": 30},
            "eval": {"batch_size": batch_size},
        }
    )
    torch.manual_seed(0)
    t = build_task(cfg.data)
    return cfg, t, build_model(cfg, t.spec)


@pytest.mark.parametrize("task", ["s5", "listops"])
def test_evaluation_reports_iterations_by_token_difficulty_as_computed_from_the_model(task):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    cfg, t, model = _tiny_eval_setup(task, batch_size=8)
    res = evaluate(model, t, cfg, env)
    # the direct computation: one forward over the whole split, every real token's own count
    b = t.batch("val", 0, t.n_val)
    with torch.no_grad():
        model.eval()
        model(b.tokens, b.mask)
    iters = torch.stack([layer.last_solve.token_iters for layer in model.fpsa_layers()]).double().mean(0)[b.mask]
    difficulty = t.token_difficulty(b.tokens)[b.mask]
    expected = {int(d): iters[difficulty == d].mean().item() for d in difficulty.unique()}
    assert res.iters_by_token_difficulty.keys() == expected.keys()
    for d, value in expected.items():
        assert res.iters_by_token_difficulty[d] == pytest.approx(value, rel=1e-12)
    ones = torch.ones_like(iters)
    slope = torch.linalg.lstsq(torch.stack([ones, difficulty.double()], 1), iters[:, None]).solution[1, 0].item()
    assert res.token_iters_slope == pytest.approx(slope, rel=1e-9, abs=1e-12)
    # the eval batch size changes nothing, the other figures included
    cfg_one, t_one, model_one = _tiny_eval_setup(task, batch_size=30)
    other = evaluate(model_one, t_one, cfg_one, env)
    assert other.iters_by_token_difficulty == pytest.approx(res.iters_by_token_difficulty, rel=1e-12)
    assert (other.loss, other.acc) == pytest.approx((res.loss, res.acc), rel=1e-6)
    assert other.iters_by_difficulty == pytest.approx(res.iters_by_difficulty)


def test_evaluation_of_a_vanilla_model_has_no_token_iterations():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    cfg = Config.model_validate(
        {
            "model": {"attention": "vanilla", "d_model": 8, "n_layers": 1, "n_heads": 2},
            "data": {"task": "parity", "seq_len": 6, "n_val": 8},
        }
    )
    t = build_task(cfg.data)
    res = evaluate(build_model(cfg, t.spec), t, cfg, env)
    assert res.iters_by_token_difficulty == {} and res.token_iters_slope is None and res.iters_by_difficulty == {}

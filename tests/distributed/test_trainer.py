"""The trainer end to end, with real processes: run directory contract, exactness across world sizes and
strategies, resume. The SIGKILL + elastic restart acceptance test is in test_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dtrain import metrics as metric
from tests.helpers.launch import metrics, model_state, summary, train
from tests.helpers.oracles import max_rel_diff

SUMMARY_KEYS = {
    metric.PARAMS,
    metric.WORLD_SIZE,
    metric.STRATEGY,
    metric.STEPS,
    metric.FINAL_VAL_ACC,
    metric.COMM_BYTES_TOTAL,
    metric.COMM_BYTES_PER_STEP,
    metric.COMM_ALLREDUCE_BYTES_PER_STEP,
    metric.COMPRESSION_RATIO,
    metric.WALL_S,
}
TRAIN_KEYS = {
    metric.STEP,
    metric.TRAIN_LOSS,
    metric.COMM_BYTES_SENT,
    metric.COMM_BYTES_CUM,
    metric.COMM_TIME_S,
    metric.TIME_STEP_S,
}


def test_two_rank_run_writes_the_run_directory(tmp_path: Path):
    run = tmp_path / "run"
    train(run, nproc=2)
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        metric.METRICS_FILE,
        metric.SUMMARY_FILE,
        "model.pt",
        "checkpoints",
    }
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["dir"] == str(run)
    rows = metrics(run)
    train_rows = [r for r in rows if metric.TRAIN_LOSS in r]
    eval_rows = [r for r in rows if metric.VAL_ACC in r]
    assert [r[metric.STEP] for r in train_rows] == list(range(1, 7))
    assert [r[metric.STEP] for r in eval_rows] == [3, 6]
    assert all(TRAIN_KEYS <= r.keys() for r in train_rows)
    assert all(metric.FPSA_ITERS_MEAN in r for r in train_rows)
    running = 0
    for r in train_rows:
        running += r[metric.COMM_BYTES_SENT]
        assert r[metric.COMM_BYTES_CUM] == running
    s = summary(run)
    assert SUMMARY_KEYS <= s.keys()
    assert s[metric.WORLD_SIZE] == 2 and s[metric.STEPS] == 6 and s[metric.COMM_BYTES_TOTAL] == running
    assert s[metric.COMM_ALLREDUCE_BYTES_PER_STEP] == 4 * s[metric.PARAMS]
    ratio = s[metric.COMM_ALLREDUCE_BYTES_PER_STEP] / s[metric.COMM_BYTES_PER_STEP]
    assert s[metric.COMPRESSION_RATIO] == pytest.approx(ratio)
    # FPSA on parity: iterations per token by ones so far, in every eval row and in the summary
    assert all(metric.VAL_TOKEN_ITERS_SLOPE in r and metric.TOKEN_ITERS_BY_DIFFICULTY in r for r in eval_rows)
    assert s[metric.TOKEN_ITERS_BY_DIFFICULTY] == eval_rows[-1][metric.TOKEN_ITERS_BY_DIFFICULTY]
    assert s[metric.FINAL_TOKEN_ITERS_SLOPE] == eval_rows[-1][metric.VAL_TOKEN_ITERS_SLOPE]


def test_exact_strategies_and_world_sizes_give_the_same_model(tmp_path: Path):
    ref = tmp_path / "w1"
    train(ref, "comm.strategy=allreduce", nproc=1)
    runs = {
        "allreduce-w2": ("allreduce", 2),
        "dad-w2": ("dad", 2),
        "ddp-w2": ("ddp", 2),
        "allreduce-w4": ("allreduce", 4),
    }
    for name, (strategy, n) in runs.items():
        train(tmp_path / name, f"comm.strategy={strategy}", nproc=n)
        assert max_rel_diff(model_state(ref), model_state(tmp_path / name)) < 1e-5, name


def test_resume_equals_uninterrupted(tmp_path: Path):
    full = tmp_path / "full"
    train(full, nproc=2)
    part = tmp_path / "part"
    proc = train(part, nproc=2, extra_env={"DTRAIN_FAULT": "kill@train:step=4,rank=0"}, check=False)
    assert proc.returncode != 0 and not (part / "model.pt").exists()
    train(part, nproc=2, resume=True)
    assert max_rel_diff(model_state(full), model_state(part)) == 0.0
    steps = [r[metric.STEP] for r in metrics(part) if metric.TRAIN_LOSS in r]
    assert steps == list(range(1, 7)), "each step logged exactly once after a resume"

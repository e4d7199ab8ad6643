"""Gradient accumulation and the training DataLoader through the real trainer (torchrun processes).

The accumulation oracle: with an exact strategy and dropout 0, (1 rank, accum 4), (2 ranks, accum 2) and
(4 ranks, accum 1) see the same examples per step and the same mean loss, so they train the same model.pt to
fp32 rounding. The DeepSpeed engine accumulates the same way; data workers never change the examples, and die
with their rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain import metrics as metric
from tests.helpers.launch import ROOT, TINY, env, metrics, model_state, summary, train
from tests.helpers.oracles import max_rel_diff

TOL = 1e-5
SHAPES = ((1, 4), (2, 2), (4, 1))  # (ranks, micro-batches): 8 examples per step, 2 per micro-batch


def _train_rows(run: Path) -> list[dict]:
    return [r for r in metrics(run) if metric.TRAIN_LOSS in r]


@pytest.mark.parametrize("strategy", ["allreduce", "ddp", "dad"])
def test_accumulation_oracle_ranks_times_micro_batches(tmp_path: Path, strategy: str):
    runs = {}
    for ranks, accum in SHAPES:
        runs[ranks, accum] = tmp_path / f"{strategy}-w{ranks}-a{accum}"
        train(runs[ranks, accum], f"comm.strategy={strategy}", f"train.grad_accum={accum}", nproc=ranks)
    reference = model_state(runs[4, 1])
    for shape, run in runs.items():
        assert max_rel_diff(reference, model_state(run)) < TOL, shape
        assert summary(run)[metric.GRAD_ACCUM] == shape[1]
    # the logged loss is the global batch's mean loss whatever the split
    losses = {shape: [r[metric.TRAIN_LOSS] for r in _train_rows(run)] for shape, run in runs.items()}
    for shape in runs:
        assert losses[shape] == pytest.approx(losses[4, 1], rel=1e-4), shape


def test_rankdad_accumulates_into_one_factorisation_per_step(tmp_path: Path):
    plain, accum = tmp_path / "a1", tmp_path / "a2"
    train(plain, "comm.strategy=rankdad", nproc=2)
    train(accum, "comm.strategy=rankdad", "train.grad_accum=2", nproc=2)
    rows_plain, rows_accum = _train_rows(plain), _train_rows(accum)
    # one synchronisation per step: the same collectives, so the same bytes, as without accumulation
    assert [r[metric.COMM_BYTES_SENT] for r in rows_accum] == [r[metric.COMM_BYTES_SENT] for r in rows_plain]
    assert not any(r[metric.SKIPPED] for r in rows_accum) and summary(accum)[metric.SKIPPED_STEPS] == 0
    # the rows of both micro-batches go into one factorisation of the same Δᵀ A: the model of accum 1
    assert max_rel_diff(model_state(plain), model_state(accum)) < TOL


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_accumulates_like_the_torch_engine(tmp_path: Path, zero_stage: int):
    torch_run, ds_run = tmp_path / "torch", tmp_path / f"ds-z{zero_stage}"
    common = ("comm.strategy=dad", "train.grad_accum=2")
    train(torch_run, *common, nproc=2)
    train(
        ds_run,
        *common,
        "train.engine=deepspeed",
        f"train.zero_stage={zero_stage}",
        nproc=2,
        extra_env={"DS_ACCELERATOR": "cpu"},
    )
    assert max_rel_diff(model_state(torch_run), model_state(ds_run)) < TOL
    assert summary(ds_run)[metric.GRAD_ACCUM] == 2
    if zero_stage == 1:
        # ZeRO-1 all-gathers each rank's (padded) half of the fp32 weights after every step: control bytes
        params = summary(ds_run)[metric.PARAMS]
        step2 = _train_rows(ds_run)[1]  # no evaluation, no replica check: the flags and the all-gather
        assert step2[metric.COMM_CONTROL_BYTES] >= 16 + 4 * params // 2


def test_data_workers_do_not_change_the_model(tmp_path: Path):
    """grad_accum 1: the examples and their order do not depend on the loader settings (bitwise)."""
    for workers in (0, 2):
        train(tmp_path / f"w{workers}", f"data.workers={workers}", "data.prefetch=1", nproc=2)
    assert max_rel_diff(model_state(tmp_path / "w0"), model_state(tmp_path / "w2")) == 0.0
    default = tmp_path / "default"
    train(default, nproc=2)
    assert max_rel_diff(model_state(tmp_path / "w0"), model_state(default)) == 0.0
    rows = _train_rows(default)
    assert all(0.0 <= r[metric.TIME_DATA_WAIT_S] <= r[metric.TIME_STEP_S] for r in rows)
    assert summary(default)[metric.TIME_DATA_WAIT_S_MEAN] <= summary(default)[metric.TIME_STEP_S_MEAN]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_data_workers_die_with_a_sigkilled_rank(tmp_path: Path):
    """A plain process SIGKILLed mid-run (no torchrun to clean up after it): its data workers are gone within
    a second (torch's own watchdog would take ~5 s), not left behind."""
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dtrain", "train", "--config", TINY, "--set", f"run.dir={run}", "data.workers=2"]
    with open(tmp_path / "log", "w") as log:  # not a pipe: a pipe would wait for the workers too
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(DTRAIN_FAULT="kill@train:step=3,rank=0"), stdout=log, stderr=log)
        assert proc.wait(timeout=240) == -9, (tmp_path / "log").read_text()[-3000:]
    deadline = time.monotonic() + 1.0
    while _processes_mentioning(str(run)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(run)) == [], "data workers outlived their rank"

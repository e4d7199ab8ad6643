"""wandb: rank 0 writes an offline run under the run directory, with our metric keys, without any network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain import metrics
from tests.helpers.launch import ROOT, TINY, env

KEYS = [
    name.encode()
    for name in (
        metrics.TRAIN_LOSS,
        metrics.COMM_BYTES_SENT,
        metrics.COMM_BYTES_CUM,
        metrics.VAL_ACC,
        metrics.FPSA_ITERS_MEAN,
        metrics.COMPRESSION_RATIO,
        metrics.BYTES_VS_ACCURACY,
        # tiny.yaml is FPSA on parity: iterations per token by ones so far
        metrics.VAL_TOKEN_ITERS_SLOPE,
        metrics.FINAL_TOKEN_ITERS_SLOPE,
        f"{metrics.TOKEN_ITERS_BY_DIFFICULTY}/1",
        metrics.TOKEN_ITERS_TABLE,
    )
]


def _no_network_prefix() -> list[str]:
    """`unshare -n`: a network namespace with nothing but loopback (gloo needs it), so any connection to the
    outside fails. Without root the run is only offline."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


@pytest.mark.parametrize("nproc", [1, 2])
def test_offline_run_lives_in_the_run_dir_and_holds_the_metric_keys(tmp_path: Path, nproc: int):
    run = tmp_path / "run"
    isolate = _no_network_prefix()
    cmd = (
        [sys.executable, "-m", "dtrain"]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dtrain"]
    )
    proc = subprocess.run(
        [*isolate, *cmd, "train", "--config", TINY, "--set", f"run.dir={run}", "log.wandb=offline"],
        cwd=ROOT,
        env=env(WANDB_MODE="offline"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "exactly one wandb run: rank 0 only"
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    missing = [k.decode() for k in KEYS if k not in blob]
    assert not missing, f"metric keys missing from the offline run: {missing}"


def test_disabled_writes_nothing(tmp_path: Path):
    run = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "dtrain", "train", "--config", TINY, "--set", f"run.dir={run}", "log.wandb=disabled"],
        cwd=ROOT,
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not (run / "wandb").exists()

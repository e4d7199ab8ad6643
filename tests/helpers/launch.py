"""Launch `dtrain train` as real processes (plain, or under torchrun) and read back its run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dtrain.metrics import SUMMARY_FILE, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("DTRAIN_FAULT", None)
    e.update(extra)
    return e


def train(run_dir: Path, *overrides: str, nproc: int = 1, config: str = TINY, torchrun_args: tuple = (),
          extra_env: dict | None = None, timeout: float = 240, check: bool = True,
          resume: bool = False) -> subprocess.CompletedProcess:
    args = ["train", "--config", config, *(["--resume"] if resume else []), "--set", f"run.dir={run_dir}", *overrides]
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", "dtrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *torchrun_args, "-m", "dtrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-12)
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst

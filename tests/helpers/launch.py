"""Launch `dtrain train` as real processes (plain, or under torchrun) and read back its run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dtrain.metrics import SUMMARY_FILE, read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("DTRAIN_FAULT", None)
    e.update(extra)
    return e


def train(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    config: str = TINY,
    torchrun_args: tuple = (),
    extra_env: dict | None = None,
    timeout: float = 240,
    check: bool = True,
    resume: bool = False,
) -> subprocess.CompletedProcess:
    args = ["train", "--config", config, *(["--resume"] if resume else []), "--set", f"run.dir={run_dir}", *overrides]
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", "dtrain", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *torchrun_args,
            "-m",
            "dtrain",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def netns_missing() -> str | None:
    """None where launch/netns_cluster can run (root and `ip netns`), else why not: the reason of a skip."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, tc)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "`ip netns` is not available"
    return None


def docker_missing() -> str | None:
    """None where launch/compose_cluster can run (a reachable docker daemon with docker-compose, or root with what
    it installs or apt-get to install it), else why not: the reason of a skip."""
    daemon = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if daemon and shutil.which("docker-compose"):
        return None
    if os.geteuid() != 0:
        return "needs root (to install docker.io and start a private dockerd) or a reachable docker daemon"
    if shutil.which("apt-get") is None and not all(
        shutil.which(c) for c in ("dockerd", "docker-compose", "debootstrap")
    ):
        return "needs apt-get to install docker.io, docker-compose and debootstrap"
    return None

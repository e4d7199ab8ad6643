"""Smoke tests of the benchmark scripts that launch processes, each run as `python -m bench.NAME` at a tiny size:
each runs end to end against the current code and produces its table. The netns time-to-accuracy run needs root
and ~1 minute: marked slow and root."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, netns_missing


def _run_module(name: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_overlap_tiny():
    proc = _run_module("overlap", ["--tiny", "--strategies", "rankdad"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rankdad | overlap |" in proc.stdout and "| yes |" in proc.stdout  # bitwise equal weights
    # every layer's collective started during backward (the scheduler's report of each step)
    assert re.search(r"\| rankdad \| overlap \|.*\| (\d+) of \1 \|", proc.stdout), proc.stdout


def test_bytes_vs_accuracy_tiny(tmp_path):
    proc = _run_module(
        "bytes_vs_accuracy",
        ["--tiny", "--nproc", "1", "--only", "rankdad-k2-bf16-rest16-pi2", "--out", str(tmp_path / "runs")],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout


def test_wire_vs_world_tiny(tmp_path):
    proc = _run_module("wire_vs_world", ["--tiny", "--out", str(tmp_path / "runs")], timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-allreduce-k4-bf16 |" in proc.stdout and "wire / rank at S = 2" in proc.stdout


def test_self_vs_vanilla_tiny_trains_both_models_with_the_trainer(tmp_path):
    docs = tmp_path / "model.md"
    tiny = [
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "fpsa.max_iter=4",
        "data.task=parity",
        "data.seq_len=8",
        "data.n_val=32",
        "train.steps=4",
        "train.batch_size=8",
    ]
    proc = _run_module(
        "self_vs_vanilla", ["--set", *tiny, "--out", str(tmp_path / "runs"), "--docs", str(docs)], timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| 0 | vanilla |" in proc.stdout and "| 0 | fpsa |" in proc.stdout
    assert (tmp_path / "runs" / "fpsa-s0" / "summary.json").exists()
    assert "Command: `.venv/bin/python -m bench.self_vs_vanilla --set " in docs.read_text()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_time_to_accuracy_tiny_on_the_netns_cluster(tmp_path):
    proc = _run_module("time_to_accuracy", ["--tiny", "--out", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout and "| allreduce |" in proc.stdout

"""The CLI's contract, as `python -m dtrain` processes: bad input fails before training with one line naming the
problem; info always works; a finished run ends with one summary line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.config import STRATEGIES
from tests.helpers.launch import ROOT, TINY

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def dtrain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "dtrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("train.stepz=3", ["train.stepz", "steps"]),
        ("train.steps=abc", ["train.steps", "'abc'", "integer"]),
        ("comm.strategy=foo", ["comm.strategy", "'foo'", *STRATEGIES]),
        ("model.attention=linear", ["model.attention", "vanilla", "fpsa"]),
        ("train.lr=-0.1", ["train.lr", "-0.1", "greater than 0"]),
        ("model.n_heads=5", ["model.d_model=32", "model.n_heads=5"]),
    ],
)
def test_bad_config_fails_before_training_with_one_line(tmp_path: Path, override: str, must_contain: list[str]):
    run_dir = tmp_path / "run"
    proc = dtrain("train", "--config", QUICKSTART, "--set", override, f"run.dir={run_dir}")
    line = _one_line_error(proc)
    assert proc.returncode == 2
    for text in must_contain:
        assert text in line, line
    assert not run_dir.exists(), "nothing may be written before the config is valid"


def test_debug_shows_the_traceback():
    proc = dtrain("train", "--config", QUICKSTART, "--set", "train.stepz=3", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "train.stepz" in proc.stderr


def test_missing_and_malformed_files(tmp_path: Path):
    line = _one_line_error(dtrain("train", "--config", str(tmp_path / "nope.yaml")))
    assert "not found" in line and "nope.yaml" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    line = _one_line_error(dtrain("train", "--config", str(bad)))
    assert "malformed YAML" in line and "line" in line
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    assert "mapping" in _one_line_error(dtrain("train", "--config", str(top)))


def test_unwritable_run_dir(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a directory cannot be created below a file, even by root
    line = _one_line_error(
        dtrain("train", "--config", QUICKSTART, "--set", f"run.dir={blocker}/run", "log.wandb=disabled")
    )
    assert "not writable" in line and str(blocker) in line


def test_info_runs_without_gpu():
    proc = dtrain("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("torch", "deepspeed", "wandb", "python", "backends", "gloo"):
        assert key in proc.stdout


def test_plain_process_run_ends_with_one_summary_line(tmp_path: Path):
    """World size 1, all-reduce: the last line says what was sent against fp32 all-reduce without a 1.0x ratio."""
    proc = dtrain(
        "train", "--config", TINY, "--set", f"run.dir={tmp_path / 'run'}", "log.wandb=disabled", "train.steps=2"
    )
    assert proc.returncode == 0, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("dtrain: done: 2 steps") and "(as many bytes as fp32 all-reduce)" in last, last

"""Smoke tests of the benchmark scripts (the bench package, each run as `python -m bench.NAME`): each runs at a
tiny size and produces its table.

The real benchmarks take minutes to an hour and are not part of any test suite; these only check that the
scripts still run end to end against the current code (and that their pure helpers compute what they say).
The netns time-to-accuracy run needs root and ~1 minute: marked slow and root.
"""
from __future__ import annotations


import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def _run_main(name: str, argv: list[str], monkeypatch) -> None:
    """bench.NAME's main() in this process, with the argv that `python -m bench.NAME ARGV` would give it."""
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), *argv])
    module.main()


def _run_module(name: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_as_a_module_and_prints_its_help(name, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_main(name, ["--help"], monkeypatch)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_recorded_command_line_runs_the_module():
    from bench._common import command_line

    argv = [str(BENCH / "overlap.py"), "--docs", "docs/benchmarks.md", "--set", "a b"]
    assert command_line(argv) == ".venv/bin/python -m bench.overlap --docs docs/benchmarks.md --set 'a b'"


def test_fpsa_step_time_tiny(monkeypatch, capsys, tmp_path):
    docs = tmp_path / "benchmarks.md"
    _run_main("fpsa_step_time", ["--tiny", "--docs", str(docs)], monkeypatch)
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "fpsa phantom n=3" in out
    assert docs.read_text().count("## FPSA step time vs vanilla") == 1
    assert "Command: `.venv/bin/python -m bench.fpsa_step_time --tiny --docs " in docs.read_text()


def test_rankdad_model_overhead_tiny(monkeypatch, capsys):
    _run_main("rankdad_model_overhead", ["--tiny"], monkeypatch)
    assert "| k1 EF bf16 |" in capsys.readouterr().out


def test_overlap_tiny():
    proc = _run_module("overlap", ["--tiny", "--strategies", "rankdad"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rankdad | overlap |" in proc.stdout and "| yes |" in proc.stdout  # bitwise equal weights
    # every layer's collective started during backward (the scheduler's report of each step)
    assert re.search(r"\| rankdad \| overlap \|.*\| (\d+) of \1 \|", proc.stdout), proc.stdout


def test_bytes_vs_accuracy_tiny(tmp_path):
    proc = _run_module("bytes_vs_accuracy", ["--tiny", "--nproc", "1", "--only", "rankdad-k2-bf16-rest16-pi2",
                                             "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout


def test_self_vs_vanilla_tiny_trains_both_models_with_the_trainer(tmp_path):
    docs = tmp_path / "model.md"
    tiny = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "fpsa.max_iter=4", "data.task=parity",
            "data.seq_len=8", "data.n_val=32", "train.steps=4", "train.batch_size=8"]
    proc = _run_module("self_vs_vanilla", ["--set", *tiny, "--out", str(tmp_path / "runs"), "--docs", str(docs)],
                       timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| 0 | vanilla |" in proc.stdout and "| 0 | fpsa |" in proc.stdout
    assert (tmp_path / "runs" / "fpsa-s0" / "summary.json").exists()
    assert "Command: `.venv/bin/python -m bench.self_vs_vanilla --set " in docs.read_text()


def test_bytes_vs_accuracy_table_compares_each_seed_with_allreduce():
    from bench import bytes_vs_accuracy as b

    rows = [{"label": "allreduce", "seed": 0, "overrides": ["comm.strategy=allreduce"], "acc": 0.90, "bytes": 400.0,
             "ratio": 1.0},
            {"label": "rankdad-k1", "seed": 0, "overrides": ["comm.strategy=rankdad"], "acc": 0.885, "bytes": 4.0,
             "ratio": 100.0}]
    text, agg = b.table(rows, ["allreduce", "rankdad-k1"])
    assert agg["rankdad-k1"]["delta"] == pytest.approx(-1.5)
    assert "| rankdad-k1 |" in text and "| no |" in text


def test_time_to_target_sums_step_times_up_to_the_first_eval_at_target():
    from bench import time_to_accuracy as t

    metrics = [{"step": 1, "time/step_s": 1.0}, {"step": 2, "time/step_s": 2.0}, {"step": 2, "val/acc": 0.5},
               {"step": 3, "time/step_s": 4.0}, {"step": 3, "val/acc": 0.95}]
    assert t.time_to_target(metrics, 0.9) == (3, 7.0)
    assert t.time_to_target(metrics, 0.99) == (None, None)
    assert t.rate_bits("100mbit") == 100e6


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the netns cluster needs root")
def test_time_to_accuracy_tiny_on_the_netns_cluster(tmp_path):
    proc = _run_module("time_to_accuracy", ["--tiny", "--out", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout and "| allreduce |" in proc.stdout

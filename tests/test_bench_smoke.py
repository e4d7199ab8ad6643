"""Smoke tests of the issue-9 benchmark scripts (bench/): each runs at a tiny size and produces its table.

The real benchmarks take minutes to an hour and are not part of any test suite; these only check that the
scripts still run end to end against the current code (and that their pure helpers compute what they say).
The netns time-to-accuracy run needs root and ~1 minute: marked slow and root.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))


def _run_main(module_name: str, argv: list[str], monkeypatch) -> None:
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{module_name}.py"), *argv])
    module.main()


def test_fpsa_step_time_tiny(monkeypatch, capsys, tmp_path):
    docs = tmp_path / "benchmarks.md"
    _run_main("fpsa_step_time", ["--tiny", "--docs", str(docs)], monkeypatch)
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "fpsa phantom n=3" in out
    assert docs.read_text().count("## FPSA step time vs vanilla") == 1


def test_rankdad_model_overhead_tiny(monkeypatch, capsys):
    _run_main("rankdad_model_overhead", ["--tiny"], monkeypatch)
    assert "| k1 EF bf16 |" in capsys.readouterr().out


def test_overlap_tiny():
    proc = subprocess.run([sys.executable, str(BENCH / "overlap.py"), "--tiny", "--strategies", "rankdad"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rankdad | overlap |" in proc.stdout and "| yes |" in proc.stdout  # bitwise equal weights


def test_bytes_vs_accuracy_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bytes_vs_accuracy.py"), "--tiny", "--nproc", "1",
                           "--only", "rankdad-k2-bf16-rest16-pi2", "--out", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout


def test_bytes_vs_accuracy_table_compares_each_seed_with_allreduce():
    import bytes_vs_accuracy as b

    rows = [{"label": "allreduce", "seed": 0, "overrides": ["comm.strategy=allreduce"], "acc": 0.90, "bytes": 400.0,
             "ratio": 1.0},
            {"label": "rankdad-k1", "seed": 0, "overrides": ["comm.strategy=rankdad"], "acc": 0.885, "bytes": 4.0,
             "ratio": 100.0}]
    text, agg = b.table(rows, ["allreduce", "rankdad-k1"])
    assert agg["rankdad-k1"]["delta"] == pytest.approx(-1.5)
    assert "| rankdad-k1 |" in text and "| no |" in text


def test_time_to_target_sums_step_times_up_to_the_first_eval_at_target():
    import time_to_accuracy as t

    metrics = [{"step": 1, "time/step_s": 1.0}, {"step": 2, "time/step_s": 2.0}, {"step": 2, "val/acc": 0.5},
               {"step": 3, "time/step_s": 4.0}, {"step": 3, "val/acc": 0.95}]
    assert t.time_to_target(metrics, 0.9) == (3, 7.0)
    assert t.time_to_target(metrics, 0.99) == (None, None)
    assert t.rate_bits("100mbit") == 100e6


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the netns cluster needs root")
def test_time_to_accuracy_tiny_on_the_netns_cluster(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "time_to_accuracy.py"), "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| rankdad-k2-bf16-rest16-pi2 |" in proc.stdout and "| allreduce |" in proc.stdout

"""Smoke tests of the benchmark scripts that launch processes, each run as `python -m bench.NAME` at a tiny size:
each runs end to end against the current code and produces its table. The netns time-to-accuracy run needs root
and ~1 minute: marked slow and root. The GPU check's dry run (every part on the CPU at tiny sizes) runs its
in-process parts and one trainer part by default; all of it, minutes on 2 cores, is marked slow."""

from __future__ import annotations

import json
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


def _gpu_check_dry_run(out, *only: str) -> dict:
    """`python -m bench.gpu_check --dry-run` into `out`: its exit status 0, its JSON, which says it is a dry run."""
    proc = _run_module("gpu_check", ["--dry-run", "--out", str(out), *(["--only", *only] if only else [])], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["note"].startswith("DRY RUN") and result["clock"] == "wall clock"
    assert {"gpu", "cuda", "torch", "driver", "host"} <= result["machine"].keys()
    failed = [c for c in result["checks"] if not c["passed"]]
    assert result["passed"] and not failed, failed
    section = (out / "benchmarks.md").read_text()
    assert section.count("## GPU validation (issue 20)") == 1 and "**DRY RUN on the CPU" in section
    assert "DRY RUN" not in (ROOT / "docs" / "benchmarks.md").read_text()
    return result


def _assert_every_figure_has_its_target(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        assert (row["met"] is None) == (row["target"] is None), row


def test_gpu_check_dry_run_of_the_bf16_run_and_every_figure(tmp_path):
    """The parts of the GPU check that run in its own process (every figure), and one trainer part."""
    from bench.gpu_check import PARTS

    result = _gpu_check_dry_run(tmp_path, "bf16", "factored", "share", "fpsa")
    assert list(result["parts"]) == ["bf16", "factored", "share", "fpsa"]
    assert set(PARTS) > set(result["parts"])
    sizes, perf = result["sizes"], result["perf"]
    _assert_every_figure_has_its_target(perf["factored"])
    assert {(r["rows"], r["k"]) for r in perf["factored"]} == {(n, k) for n in sizes["rows"] for k in sizes["ranks"]}
    _assert_every_figure_has_its_target(perf["share"])
    assert {r["target"] is not None for r in perf["share"]} == {True, False}  # below and from the target rows
    _assert_every_figure_has_its_target(perf["fpsa"]["step"])
    low, high = sizes["fpsa_iters"]
    flat = perf["fpsa"]["memory_vs_max_iter"]
    assert [(r["backward"], r["max_iter"], r["figure"]) for r in flat] == [
        ("implicit", [low, high], "saved_mib"),
        ("phantom", [low, high], "saved_mib"),  # no CUDA allocator in a dry run: autograd's saved bytes
    ]
    assert all(r["met"] for r in flat)  # implicit and phantom keep one differentiable step, whatever max_iter
    bf16 = result["checks"][0]
    assert bf16["name"] == "trainer dad bf16 autocast, world size 1" and "bf16" in bf16["detail"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    from bench.gpu_check import PARTS
    from dtrain.compression.registry import STRATEGY_NAMES

    result = _gpu_check_dry_run(tmp_path)
    assert list(result["parts"]) == list(PARTS)
    names = [c["name"] for c in result["checks"]]
    assert names[0] == "pytest -m gpu"
    world1 = [n for n in names if n.startswith("trainer ") and n.endswith(", world size 1") and "bf16" not in n]
    assert world1 == [f"trainer {s}, world size 1" for s in STRATEGY_NAMES]
    assert "dad = allreduce, 2 ranks" in names and "rankdad-full-rank = allreduce, 2 ranks" in names


@pytest.mark.slow
def test_soak_short_run_stays_flat(tmp_path):
    """A short bench.soak (docs/reliability.md has the 5,000-step one): memory and descriptors flat after
    warm-up, the checkpoint directory within checkpoint.keep, metrics.jsonl linear in the steps."""
    proc = _run_module("soak", ["--steps", "600", "--every", "1", "--out", str(tmp_path)], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "soak.json").read_text())["figures"]
    assert figures["rss"]["met"] and figures["fds"]["met"], figures
    assert figures["max_checkpoints"] <= 2 + 1  # checkpoint.keep, and the one being written
    assert figures["metrics_lines_per_step_deviation"] < 0.05

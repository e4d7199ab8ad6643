"""The correctness half of `bench.gpu_check`: the GPU test suite, and the real trainer (`python -m dtrain train` on
tests/configs/tiny.yaml, as separate processes) on the GPU's production path.

- `pytest -m gpu`;
- every strategy of the registry at world size 1 with NCCL on the GPU (a CPU tensor handed to NCCL fails there);
- 2 ranks with gloo on CUDA tensors, both on cuda:0 (one GPU cannot host two NCCL ranks, and torchrun would put
  rank 1 on cuda:1, so the ranks are started here with LOCAL_RANK=0): dad against allreduce and full-rank rankdad
  against allreduce, by the largest relative difference of the trained model.pt;
- a bf16 autocast run.

A dry run starts the same processes with gloo on CPU tensors (DTRAIN_DEVICE=cpu): it checks this script's paths,
not the GPU's. Every check is a dict {"name", "passed", "detail", "seconds"}; a failure is recorded, never raised,
so one broken path does not hide the others.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dtrain import metrics
from dtrain.compression.registry import STRATEGY_NAMES
from tests.helpers.launch import ROOT, TINY, env, model_state, summary
from tests.helpers.oracles import max_rel_diff
from tests.helpers.ranks import free_port

# the tolerances on the largest relative difference of model.pt against allreduce on the same 2 ranks
PAIRS = {"dad": ([], 1e-5), "rankdad-full-rank": (["comm.rank=64"], 1e-4)}  # rank 64 ≥ min(in, out) of tiny.yaml
BF16_STRATEGY = "dad"  # its captured rows travel in 16 bits under autocast: more of the GPU path than allreduce
RUN_TIMEOUT_S = 120
PYTEST_TIMEOUT_S = 150


def check(name: str, passed: bool, detail: str, t0: float) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}


def run_tests() -> dict[str, Any]:
    """`pytest -m gpu` over the whole suite: passes when pytest exits 0 (without CUDA every gpu test skips)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return check("pytest -m gpu", False, f"timed out after {PYTEST_TIMEOUT_S} s", t0)
    lines = proc.stdout.strip().splitlines()
    counts = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|skipped|error)", line)), "")
    detail = f"exit {proc.returncode}: {counts.strip('= ')}" + (
        "" if torch.cuda.is_available() else " (no CUDA: every gpu test skips)"
    )
    if proc.returncode:
        detail += "\n" + "\n".join(lines[-15:])
    return check("pytest -m gpu", proc.returncode == 0, detail, t0)


def launch_env(dry_run: bool, world: int) -> dict[str, str]:
    if dry_run:
        return {"DTRAIN_DEVICE": "cpu", "DTRAIN_BACKEND": "gloo"}
    return {"DTRAIN_BACKEND": "nccl" if world == 1 else "gloo"}


def backend_words(dry_run: bool, world: int) -> str:
    return "gloo on CPU tensors" if dry_run else ("NCCL on cuda:0" if world == 1 else "gloo on CUDA tensors")


def train(run_dir: Path, overrides: list[str], world: int, dry_run: bool) -> str | None:
    """Train tiny.yaml on `world` ranks started here (rank r's output in `run_dir`.rank<r>.log); None when every
    rank exited 0 and the run wrote its summary, else what went wrong. A failed rank stops the others."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "dtrain", "train", "--config", TINY, "--set", f"run.dir={run_dir}", *overrides]
    procs, logs = [], []
    for rank in range(world):
        rank_env = env(**launch_env(dry_run, world))
        if world > 1:
            rank_env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK="0",  # every rank on cuda:0
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = run_dir.parent / f"{run_dir.name}.rank{rank}.log"
        logs.append(log)
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    if not any(codes) and (run_dir / metrics.SUMMARY_FILE).exists():
        return None
    tails = "\n".join(f"-- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-12:]) for log in logs)
    return f"exit codes {codes}\n{tails}"


def trained(run_dir: Path) -> str:
    """One line on a finished run."""
    s = summary(run_dir)
    return (
        f"{s['steps']} steps, {s['precision']}, val loss {s[metrics.FINAL_VAL_LOSS]:.4f}, {s['skipped_steps']} skipped"
    )


def finite_run(run_dir: Path) -> bool:
    s = summary(run_dir)
    return math.isfinite(s[metrics.FINAL_VAL_LOSS]) and s["skipped_steps"] == 0


def run_strategies(out: Path, dry_run: bool) -> list[dict[str, Any]]:
    """Every strategy through the trainer at world size 1."""
    checks = []
    for strategy in STRATEGY_NAMES:
        t0 = time.perf_counter()
        run_dir = out / f"w1-{strategy}"
        failure = train(run_dir, [f"comm.strategy={strategy}"], 1, dry_run)
        ok = failure is None and finite_run(run_dir)
        detail = failure or f"{backend_words(dry_run, 1)}: {trained(run_dir)}"
        checks.append(check(f"trainer {strategy}, world size 1", ok, detail, t0))
    return checks


def run_pairs(out: Path, dry_run: bool) -> list[dict[str, Any]]:
    """dad and full-rank rankdad against allreduce, all on the same 2 ranks."""
    t0 = time.perf_counter()
    reference = out / "w2-allreduce"
    reference_failure = train(reference, ["comm.strategy=allreduce"], 2, dry_run)
    detail = reference_failure or f"{backend_words(dry_run, 2)}: {trained(reference)}"
    checks = [check("trainer allreduce, 2 ranks", reference_failure is None, detail, t0)]
    for label, (extra, tolerance) in PAIRS.items():
        t0 = time.perf_counter()
        run_dir = out / f"w2-{label}"
        strategy = label.split("-")[0]
        failure = reference_failure or train(run_dir, [f"comm.strategy={strategy}", *extra], 2, dry_run)
        if failure:
            checks.append(check(f"{label} = allreduce, 2 ranks", False, failure, t0))
            continue
        diff = max_rel_diff(model_state(run_dir), model_state(reference))
        detail = (
            f"{backend_words(dry_run, 2)}: max relative difference of model.pt {diff:.2e} (tolerance {tolerance:g})"
        )
        checks.append(check(f"{label} = allreduce, 2 ranks", diff < tolerance, detail, t0))
    return checks


def run_bf16(out: Path, dry_run: bool) -> dict[str, Any]:
    """bf16 autocast trains (finite loss, no skipped step) and changes the result against an fp32 run of the same
    strategy (so autocast was in effect)."""
    t0 = time.perf_counter()
    name = f"trainer {BF16_STRATEGY} bf16 autocast, world size 1"
    runs = {p: out / f"w1-{BF16_STRATEGY}-{p}" for p in ("fp32", "bf16")}
    for precision, run_dir in runs.items():
        failure = train(run_dir, [f"comm.strategy={BF16_STRATEGY}", f"train.precision={precision}"], 1, dry_run)
        if failure:
            return check(name, False, f"{precision}: {failure}", t0)
    diff = max_rel_diff(model_state(runs["bf16"]), model_state(runs["fp32"]))
    detail = f"{backend_words(dry_run, 1)}: {trained(runs['bf16'])}; max relative difference to fp32 {diff:.2e}"
    ok = finite_run(runs["bf16"]) and summary(runs["bf16"])["precision"] == "bf16" and diff > 0
    return check(name, ok, detail, t0)

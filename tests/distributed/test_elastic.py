"""Elastic scale-down and scale-up (docs/reliability.md): two torchrun agents with --nnodes 1:2 on loopback. A
node lost for good at 40% of the run: the job re-forms on the node that is left and resumes from the last
checkpoint at world size 1. A node that joins a running job: the job re-forms at world size 2 and resumes. Data
order and the global batch do not depend on the world size, so an exact strategy ends with the model of an
uninterrupted 2-rank run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers.elastic import ElasticJob, stop_after
from tests.helpers.launch import ROOT, model_state, summary, train
from tests.helpers.oracles import max_rel_diff

pytestmark = pytest.mark.faults

STEPS, STOP_AT = 40, 16  # the node goes at 40% of the run; checkpoints every 5 steps, so steps 16 on are redone
RUN = (f"train.steps={STEPS}", "checkpoint.every=5", "eval.every=20", "comm.timeout_s=10")
TOL = 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """strategy -> the run directory of the same run on 2 ranks throughout (torchrun --standalone)."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp("uninterrupted") / strategy
            train(runs[strategy], *RUN, f"comm.strategy={strategy}", nproc=2)
        return runs[strategy]

    return get


def scale_down(run_dir: Path, strategy: str) -> str:
    """Node 1 stops itself after step STOP_AT and is then killed with its agent; returns the agents' output."""
    job = ElasticJob(run_dir, *RUN, f"comm.strategy={strategy}")
    try:
        survivor = job.start(0)
        lost = job.start(1, DTRAIN_FAULT=stop_after(STOP_AT))
        job.wait_for_stopped_worker(lost)
        job.kill(lost)
        assert job.wait(survivor) == 0, job.output()[-4000:]
    finally:
        job.close()
    return job.output()


def scale_up(run_dir: Path, strategy: str) -> str:
    """Node 0 trains alone; node 1 joins while node 0's worker is held after step STOP_AT; returns the output."""
    job = ElasticJob(run_dir, *RUN, f"comm.strategy={strategy}")
    try:
        first = job.start(0, DTRAIN_FAULT=stop_after(STOP_AT))
        held = job.wait_for_stopped_worker(first)
        joining = job.start(1)
        job.wait_for_log(0, "closing signal SIGTERM")  # node 0's agent re-forms the job to take node 1 in
        os.kill(held, signal.SIGCONT)  # the pending SIGTERM then ends the old worker
        assert job.wait(first) == 0 and job.wait(joining) == 0, job.output()[-4000:]
    finally:
        job.close()
    return job.output()


@pytest.mark.parametrize("strategy", ["dad", *(pytest.param(s, marks=pytest.mark.slow) for s in ("allreduce", "ddp"))])
def test_a_node_lost_for_good_leaves_the_model_unchanged(tmp_path: Path, uninterrupted, strategy: str):
    run = tmp_path / "run"
    out = scale_down(run, strategy)
    assert "checkpoint was written by 2 ranks, this job has 1" in out, out[-4000:]
    assert "resumed from" in out
    assert summary(run)["world_size"] == 1
    assert max_rel_diff(model_state(run), model_state(uninterrupted(strategy))) < TOL


@pytest.mark.parametrize("strategy", ["allreduce", pytest.param("dad", marks=pytest.mark.slow)])
def test_a_node_that_joins_is_taken_in_and_the_model_is_unchanged(tmp_path: Path, uninterrupted, strategy: str):
    run = tmp_path / "run"
    out = scale_up(run, strategy)
    assert "checkpoint was written by 1 ranks, this job has 2" in out, out[-4000:]
    assert summary(run)["world_size"] == 2
    assert max_rel_diff(model_state(run), model_state(uninterrupted(strategy))) < TOL


# ------------------------------------------------------------------------------------------ lossy strategies
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["rankdad", "powersgd"])
def test_a_lossy_strategy_resets_its_memory_when_the_world_shrinks_and_still_learns(tmp_path: Path, strategy: str):
    """Error-feedback residuals and warm starts are per rank and sized for the world that wrote them: at another
    world size they start fresh, with a logged line. The cost in accuracy, against an uninterrupted 2-rank run of
    the quickstart, two seeds (docs/reliability.md has the figures)."""
    steps = 300
    run_args = ("checkpoint.every=50", "comm.timeout_s=10", f"comm.strategy={strategy}")
    for seed in (0, 1):
        ref = tmp_path / f"uninterrupted-{seed}"
        train(ref, *run_args, f"train.seed={seed}", nproc=2, config=QUICKSTART, timeout=600)
        job = ElasticJob(tmp_path / f"elastic-{seed}", *run_args, f"train.seed={seed}", config=QUICKSTART)
        try:
            survivor = job.start(0)
            lost = job.start(1, DTRAIN_FAULT=stop_after(int(0.4 * steps)))
            job.wait_for_stopped_worker(lost, timeout=600)
            job.kill(lost)
            assert job.wait(survivor, timeout=900) == 0, job.output()[-4000:]
        finally:
            job.close()
        out = job.output()
        assert "per-rank strategy memory and RNG start fresh" in out
        acc, ref_acc = (summary(r)["final/val_acc"] for r in (job.run_dir, ref))
        print(
            f"elastic {strategy} seed {seed}: scaled down at step {int(0.4 * steps)}: {acc:.4f}; "
            f"uninterrupted: {ref_acc:.4f}"
        )
        assert acc > ref_acc - 0.05, (acc, ref_acc)

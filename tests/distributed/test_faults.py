"""Fault injection with real processes: every fault must end in a clear outcome, never a silent one.

Each test injects one fault through DTRAIN_FAULT (dtrain/faults.py) or by damaging files, and checks the
outcome against an uninterrupted run (the exact oracle) or against the expected one-line error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT, TINY, env, metrics, model_state, netns_missing, train
from tests.helpers.oracles import max_rel_diff

pytestmark = pytest.mark.faults

KILL_MID_STEP = {"DTRAIN_FAULT": "kill@train:step=5,rank=1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    train(run, nproc=2)
    return run


def _last_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error")]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


# a NaN on one rank, skipped by all: tests/distributed/test_nan_every_strategy.py (every strategy)


def test_nan_with_stop_policy_stops_every_rank(tmp_path: Path):
    proc = train(
        tmp_path / "stop",
        "train.nan_policy=stop",
        nproc=2,
        extra_env={"DTRAIN_FAULT": "nan@loss:step=2,rank=0"},
        check=False,
    )
    assert proc.returncode != 0
    assert "non-finite loss or gradient" in _last_line(proc) and "step 2" in _last_line(proc)


def test_silent_divergence_is_caught_and_named(tmp_path: Path):
    proc = train(
        tmp_path / "diverge",
        "train.consistency_every=1",
        nproc=2,
        extra_env={"DTRAIN_FAULT": "perturb@train:step=2,rank=1"},
        check=False,
    )
    assert proc.returncode != 0
    line = _last_line(proc)
    assert "ReplicaMismatch" in line and "embed.weight" in line


def test_sigkill_mid_step_resumes_to_the_same_model(tmp_path: Path, uninterrupted: Path):
    run = tmp_path / "killed"
    proc = train(run, nproc=2, torchrun_args=("--max-restarts=1",), extra_env=KILL_MID_STEP)
    assert "resumed from" in proc.stderr
    assert max_rel_diff(model_state(uninterrupted), model_state(run)) == 0.0


def test_sigkill_mid_checkpoint_never_replaces_the_last_good_one(tmp_path: Path, uninterrupted: Path):
    run = tmp_path / "killed_ckpt"
    proc = train(
        run, nproc=2, torchrun_args=("--max-restarts=1",), extra_env={"DTRAIN_FAULT": "kill@checkpoint:step=6,rank=0"}
    )
    assert "resumed from" in proc.stderr and "step_00000003" in proc.stderr
    assert max_rel_diff(model_state(uninterrupted), model_state(run)) == 0.0
    assert not list((run / "checkpoints").glob("*.partial"))


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, uninterrupted: Path):
    run = tmp_path / "corrupt"
    train(run, nproc=2)
    newest = run / "checkpoints" / "step_00000006"
    victim = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = train(run, nproc=2, resume=True)
    assert "step_00000006 is unusable" in proc.stderr and "resumed from" in proc.stderr
    assert "step_00000003" in proc.stderr
    assert max_rel_diff(model_state(uninterrupted), model_state(run)) == 0.0


def test_hung_peer_fails_within_the_timeout_naming_the_rank(tmp_path: Path):
    t0 = time.monotonic()
    proc = train(
        tmp_path / "hung",
        "comm.timeout_s=5",
        nproc=2,
        extra_env={"DTRAIN_FAULT": "stop@train:step=2,rank=1"},
        check=False,
        timeout=180,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    line = _last_line(proc)
    assert "PeerUnresponsive" in line and "rank 1" in line, line
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"


def test_batch_not_divisible_by_world_size_names_both_numbers(tmp_path: Path):
    proc = train(tmp_path / "div", "train.batch_size=7", nproc=2, check=False)
    assert proc.returncode != 0
    assert "train.batch_size=7 is not divisible by the world size 2" in _last_line(proc)
    assert 'File "' + str(ROOT / "dtrain") not in proc.stderr  # no dtrain traceback


def test_compression_rank_above_layer_dims_falls_back_and_says_so(tmp_path: Path):
    run = tmp_path / "rank"
    proc = train(run, "comm.strategy=rankdad", "comm.rank=64", "train.steps=2")
    assert "warning: comm.rank=64 is not below min(in, out)" in proc.stderr and "blocks.0.attn.q (16x16)" in proc.stderr
    assert "MORE bytes than fp32 all-reduce" in proc.stderr
    assert json.loads((run / "plan.json").read_text())["warnings"]


@pytest.mark.root
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_link_down_fails_within_the_timeout_naming_the_unreachable_rank(tmp_path: Path):
    """Two hosts in network namespaces; host 1's switch port goes down mid-run."""
    run = tmp_path / "linkdown"
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "netns_cluster.py"),
        "--hosts",
        "2",
        "--prefix",
        "dtfl",
        "--subnet",
        "10.78.0",
        "--port",
        "29471",
        "--timeout",
        "170",
        "--",
        "--config",
        TINY,
        "--set",
        f"run.dir={run}",
        "train.steps=100000",
        "eval.every=0",
        "checkpoint.every=0",
        "comm.timeout_s=8",
        "log.wandb=disabled",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(metrics(run)) >= 5:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", "dtfl-sw", "link", "set", "p1", "down"], check=True)
        out, _ = proc.communicate(timeout=150)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    assert proc.returncode != 0
    host0 = (run.with_name(run.name + ".netns-logs") / "host0.log").read_text()
    host1 = (run.with_name(run.name + ".netns-logs") / "host1.log").read_text()
    assert "PeerUnresponsive" in host0 and "unresponsive: rank 1" in host0, host0[-3000:]
    assert "PeerUnresponsive" in host1 and "rank 0" in host1, host1[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s after the link went down"
    assert not [
        ns
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if ns.startswith("dtfl-")
    ], "namespaces torn down"


def test_sigkill_mid_step_with_a_rank_budget_resumes_to_the_same_model(tmp_path: Path):
    """rank-dAD's per-layer ranks from a byte budget, re-planned every 2 steps from the measured spectra: the plan,
    its schedule and the spectra it re-plans from are checkpointed, so a restarted job plans as the uninterrupted
    one did and ends with the same model."""
    budget = ("comm.strategy=rankdad", "comm.budget_bytes=6000", "comm.replan_every=2", "comm.spectrum_every=1")
    reference = tmp_path / "uninterrupted"
    train(reference, *budget, nproc=2)
    run = tmp_path / "killed"
    proc = train(run, *budget, nproc=2, torchrun_args=("--max-restarts=1",), extra_env=KILL_MID_STEP)
    assert "resumed from" in proc.stderr
    plans = [json.loads((r / "plan.json").read_text())["budget"]["history"] for r in (reference, run)]
    assert len(plans[0]) >= 2, "the ranks were re-planned during the run"
    assert plans[0] == plans[1]
    assert max_rel_diff(model_state(reference), model_state(run)) == 0.0

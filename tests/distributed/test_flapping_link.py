"""A flapping link (docs/reliability.md): two hosts in network namespaces (launch/netns_cluster.py); host 1's
switch port goes down for 5 s and comes back. With comm.timeout_s longer than the outage the job waits it out:
no restart, no step lost. With a shorter timeout the collectives fail, torchrun restarts the workers, they
resume from the last checkpoint once the link is back. Either way the model is the uninterrupted run's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.metrics import STEP, TRAIN_LOSS
from tests.helpers.launch import ROOT, TINY, env, metrics, model_state, netns_missing, train
from tests.helpers.oracles import max_rel_diff

pytestmark = [
    pytest.mark.faults,
    pytest.mark.root,
    pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing())),
]

STEPS, OUTAGE_S, PREFIX = 300, 5.0, "dtfp"
RUN = (f"train.steps={STEPS}", "checkpoint.every=20", "eval.every=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("flapping") / "uninterrupted"
    train(run, *RUN, nproc=2)
    return run


def flap_host1_link_mid_run(run: Path, timeout_s: float, max_restarts: int) -> tuple[int, str]:
    """Train on 2 namespace hosts; after 40 steps take host 1's switch port down for OUTAGE_S. Returns the
    cluster's exit code and both hosts' logs."""
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "netns_cluster.py"),
        *("--hosts", "2", "--prefix", PREFIX, "--subnet", "10.79.0", "--port", "29473", "--timeout", "240"),
        *("--max-restarts", str(max_restarts)),
        "--",
        *("--config", TINY, "--set", f"run.dir={run}", *RUN, f"comm.timeout_s={timeout_s}", "log.wandb=disabled"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(metrics(run)) < 40:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        subprocess.run(["ip", "-n", f"{PREFIX}-sw", "link", "set", "p1", "down"], check=True)
        time.sleep(OUTAGE_S)
        subprocess.run(["ip", "-n", f"{PREFIX}-sw", "link", "set", "p1", "up"], check=True)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    logs = run.with_name(run.name + ".netns-logs")
    return proc.returncode, out + "".join((logs / f"host{i}.log").read_text() for i in (0, 1))


def test_an_outage_shorter_than_the_timeout_is_waited_out_with_no_step_lost(tmp_path: Path, uninterrupted: Path):
    run = tmp_path / "wait"
    code, out = flap_host1_link_mid_run(run, timeout_s=30, max_restarts=0)
    assert code == 0, out[-4000:]
    assert "resumed from" not in out and "PeerUnresponsive" not in out
    steps = [row[STEP] for row in metrics(run) if TRAIN_LOSS in row]
    assert steps == list(range(1, STEPS + 1)), "every step logged once"
    assert max_rel_diff(model_state(run), model_state(uninterrupted)) < 1e-5


def test_an_outage_longer_than_the_timeout_restarts_and_resumes_to_the_same_model(tmp_path: Path, uninterrupted):
    run = tmp_path / "restart"
    code, out = flap_host1_link_mid_run(run, timeout_s=2, max_restarts=2)
    assert code == 0, out[-4000:]
    assert "PeerUnresponsive" in out and "resumed from" in out, out[-4000:]
    steps = [row[STEP] for row in metrics(run) if TRAIN_LOSS in row]
    assert steps == list(range(1, STEPS + 1)), "the rows after the checkpoint were replaced, not repeated"
    assert max_rel_diff(model_state(run), model_state(uninterrupted)) < 1e-5

"""launch/netns_cluster: a 2-host cluster in network namespaces with a 100 Mbit/s cap per host.

What the link counters see beyond dtrain's reported gradient wire bytes (measured, docs/launch.md):
- TCP/IP/Ethernet headers and the ACKs of the data received: about 7% of the payload with a 1500-byte MTU
  (per step, 20 steps of difference between two runs: 1.070x and 1.069x of the reported bytes);
- a fixed 65-90 KB per run: rendezvous, process-group set-up, the final evaluation, the end-of-run
  checkpoint's barriers and plan exchange; and per step the loss/NaN-flag all-reduce (16 bytes of payload).
The run below is sized so that gradients dominate: fp32 all-reduce of a 100,866-parameter model (403 KB per
step) for 25 steps, evaluation and checkpoint only at the end. Expected ratio about 1.08; the test allows 15%.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dtrain.metrics import COMM_TIME_PER_STEP_S, COMM_WIRE_BYTES_PER_STEP, METRICS_FILE, WORLD_SIZE
from tests.helpers.launch import ROOT, TINY, env, netns_missing

SCRIPT = ROOT / "launch" / "netns_cluster"
PREFIX = "dtnt"  # distinct from the tool's default, so a user's cluster is never touched


needs_netns = pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-")]


def _cluster(run_dir: Path, *dtrain_sets: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [
        str(SCRIPT),
        "--hosts",
        "2",
        "--nproc-per-host",
        "1",
        "--rate",
        "100mbit",
        "--prefix",
        PREFIX,
        "--timeout",
        str(timeout - 60),
        "--",
        "--config",
        TINY,
        "--set",
        f"run.dir={run_dir}",
        *dtrain_sets,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.root
@needs_netns
def test_rate_capped_two_host_run_link_bytes_match_reported_wire_bytes(tmp_path: Path):
    run_dir = tmp_path / "netns-allreduce"
    proc = _cluster(
        run_dir,
        "comm.strategy=allreduce",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "train.steps=25",
        "eval.every=0",
        "checkpoint.every=0",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _our_namespaces() == [], "namespaces left behind"
    report = json.loads(run_dir.with_name(run_dir.name + ".netns.json").read_text())
    assert report["summary"][WORLD_SIZE] == 2 and report["rate"] == "100mbit"
    reported = report["summary"][COMM_WIRE_BYTES_PER_STEP] * 25
    assert reported > 5e6, "the run must be large enough for gradient traffic to dominate"
    for link in report["links"]:
        assert link["exit_code"] == 0
        assert link["reported_wire_bytes"] == reported
        assert abs(link["tx_bytes"] / reported - 1) <= 0.15, link
        assert abs(link["rx_bytes"] / reported - 1) <= 0.15, link
    # the cap was in force: every host's tbf held packets back, and gradient sync took at least the time the
    # reported bytes need at 100 Mbit/s (uncapped, the veth moves them in well under a millisecond)
    assert all(link["tbf_overlimits"] > 0 for link in report["links"])
    assert report["summary"][COMM_TIME_PER_STEP_S] >= 0.9 * report["summary"][COMM_WIRE_BYTES_PER_STEP] * 8 / 100e6


@pytest.mark.root
@needs_netns
def test_failed_job_tears_down_and_stale_namespaces_are_removed(tmp_path: Path):
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-h0"], check=True)  # as if a crashed run left it
    try:
        run_dir = tmp_path / "netns-fails"
        # batch 7 over 2 ranks: every rank stops with a config error after the rendezvous
        proc = _cluster(run_dir, "train.batch_size=7", timeout=240)
        assert proc.returncode == 1
        assert f"removed stale namespaces {PREFIX}-h0" in proc.stderr
        assert _our_namespaces() == []
        report = json.loads(run_dir.with_name(run_dir.name + ".netns.json").read_text())
        assert report["exit_codes"] == [1, 1] and report["summary"] is None
        assert "not divisible by the world size 2" in Path(report["links"][0]["log"]).read_text()
    finally:
        for ns in _our_namespaces():
            subprocess.run(["ip", "netns", "del", ns])


@pytest.mark.root
@needs_netns
def test_ctrl_c_stops_the_job_and_tears_down(tmp_path: Path):
    import signal
    import time

    run_dir = tmp_path / "netns-interrupted"
    # Started with SIGINT ignored, as a background job of a non-interactive shell (`make test-all &`, a CI
    # runner) starts everything: Python then installs no KeyboardInterrupt handler, so the tool must install
    # its own. It did not, and this test timed out whenever the suite itself was started that way.
    cmd = [
        "sh",
        "-c",
        'trap "" INT; exec "$0" "$@"',
        str(SCRIPT),
        "--hosts",
        "2",
        "--prefix",
        PREFIX,
        "--",
        "--config",
        TINY,
        "--set",
        f"run.dir={run_dir}",
        "train.steps=100000",
    ]
    tool = subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir / METRICS_FILE).exists():  # training has started
            time.sleep(0.5)
        assert (run_dir / METRICS_FILE).exists(), "the job did not start"
        tool.send_signal(signal.SIGINT)
        _, err = tool.communicate(timeout=120)  # teardown waits at most ~10 s for hosts + 10 s per namespace
    finally:
        if tool.poll() is None:  # the tool failed us: leave nothing of its job behind either
            tool.kill()
            tool.wait()
            for ns in _our_namespaces():
                for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                    subprocess.run(["kill", "-9", pid])
                subprocess.run(["ip", "netns", "del", ns])
    assert tool.returncode == 130 and "interrupted" in err
    assert _our_namespaces() == []
    left = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout.split()
    assert left == [], "dtrain processes left running"


def test_bad_rate_is_refused():
    proc = subprocess.run(
        [str(SCRIPT), "--rate", "fast", "--", "--config", TINY],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--rate 'fast'" in proc.stderr

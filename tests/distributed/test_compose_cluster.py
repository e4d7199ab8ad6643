"""launch/compose_cluster for real: images built on this machine, node containers on a private compose network,
the job's model against a torchrun run, a node container killed mid-run, a rate-capped run.

Three cluster runs, each shared by the tests that read it (module fixtures), and torchrun as the oracle:
- dad on 2 nodes x 1 rank = torchrun allreduce on 2 ranks (< 1e-5; dropout is 0 in tiny.yaml);
- the same job on 4 nodes, node3's container `docker kill`ed after the first checkpoint: the tool starts the
  container again, torchrun restarts the other nodes' workers, all rejoin and resume, and the job ends with the
  uninterrupted model (the world size changes only the order of sums: < 1e-5);
- 2 nodes, allreduce at 100 Mbit/s per node: gradient sync takes the time its wire bytes need at that rate;
- 2 nodes training, the tool SIGINTed as a terminal's Ctrl-C reaches it: exit 130, nothing of the project left
  on the daemon, the private daemon stopped.
After every test the host's iptables rules, interfaces, mounts and dockerd processes are as before the module.
The first run on a machine installs docker.io, docker-compose and debootstrap and builds the images (minutes);
later runs find them cached (launch/docker_engine.py, STATE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from dtrain.metrics import COMM_TIME_PER_STEP_S, COMM_WIRE_BYTES_PER_STEP, METRICS_FILE, STEPS, WORLD_SIZE
from tests.helpers.launch import ROOT, TINY, docker_missing, env, model_state, train
from tests.helpers.oracles import max_rel_diff

TOOL = ROOT / "launch" / "compose_cluster"
PROJECT = "dtrtest"  # not the tool's default, so a user's cluster is never touched
SUBNET = "10.80.0"
PRIVATE_SOCKET = Path("/run/dtrain-docker/docker.sock")  # docker_engine.SOCKET, while the tool runs its own daemon
# long enough to kill a node mid-run (after the first checkpoint, about 40 steps before the end) and resume from
# a checkpoint; 100 steps checked nothing more and took about 3 s more per run (the oracle and both dad runs)
DAD_STEPS = 50
DAD_JOB = ("comm.strategy=dad", f"train.steps={DAD_STEPS}", "checkpoint.every=10", "eval.every=0")
# gradients large enough that sync time is bandwidth, not per-message latency: 6.3 MB of fp32 per step
CAPPED_JOB = ("comm.strategy=allreduce", "model.d_model=256", "model.n_layers=2", "model.n_heads=4")
CAPPED_JOB += ("train.steps=10", "eval.every=0", "checkpoint.every=0")
RATE_BITS = 100e6

needs_docker = pytest.mark.skipif(docker_missing() is not None, reason=str(docker_missing()))


def _cluster_cmd(out: Path, *options: str, sets: tuple[str, ...]) -> list[str]:
    return [str(TOOL), "--project", PROJECT, "--subnet", SUBNET, "--out", str(out), *options, "--"] + [
        "--config",
        TINY,
        "--set",
        *sets,
    ]


def _cluster(out: Path, *options: str, sets: tuple[str, ...]) -> dict:
    proc = subprocess.run(
        _cluster_cmd(out, *options, sets=sets), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _report(out)


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".compose.json").read_text())


def _docker(*args: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, DOCKER_HOST=f"unix://{PRIVATE_SOCKET}") if PRIVATE_SOCKET.exists() else dict(os.environ)
    return subprocess.run(["docker", *args], env=e, capture_output=True, text=True, timeout=60)


def _job_dir(deadline: float, tool: subprocess.Popen) -> Path | None:
    """The job's run directory in the project's volume, once the volume exists (None if the tool exits first).
    Looked up once: polling the files under it costs no docker process, which on 2 cores took CPU from the job."""
    while time.monotonic() < deadline and tool.poll() is None:
        inspect = _docker("volume", "inspect", "-f", "{{.Mountpoint}}", f"{PROJECT}_runs")
        if inspect.returncode == 0:
            return Path(inspect.stdout.strip()) / "job"
        time.sleep(0.2)
    return None


def _engine_module():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import docker_engine
    finally:
        sys.path.remove(str(ROOT / "launch"))
    return docker_engine


@contextmanager
def _daemon_as_left(private: bool):
    """The daemon the tool ran on, to look at what it left there: the reachable one, or the tool's private one
    started again on its data root without the prune its start does (so leftovers show), stopped afterwards
    (pruning then, so a failed check leaves nothing behind either)."""
    engine = _engine_module().Engine()
    if not private:
        yield engine
        return
    engine._prune = lambda: None
    engine._start_private()
    del engine._prune
    try:
        yield engine
    finally:
        engine._stop_private()


# ------------------------------------------------------------------------------------------ the host's state
def _host_state() -> dict:
    state = {}
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True, check=True).stdout
            lines = [re.sub(r"\[\d+:\d+\]", "", ln) for ln in out.splitlines() if not ln.startswith("#")]
            state[tool] = "\n".join(lines)  # the rules, without counters and timestamps
        else:
            state[tool] = None
    state["links"] = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    # without /run/netns: the netns tests' namespaces, which other test processes on the machine may be making
    # meanwhile (docker keeps its own under its exec root, which stays in)
    state["mounts"] = [ln for ln in Path("/proc/mounts").read_text().splitlines() if " /run/netns" not in ln]
    state["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    state["dockerd"] = sorted(subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split())
    return state


@pytest.fixture(scope="module", autouse=True)
def host_before() -> dict:
    return _host_state()


@pytest.fixture(autouse=True)
def host_left_as_found(host_before: dict):
    yield
    after = _host_state()
    for tool in ("iptables-save", "ip6tables-save"):
        if host_before[tool] is None:  # installed by the tool (with docker.io): then there must be no rules
            assert not after[tool], f"{tool}: rules were added\n{after[tool]}"
            after[tool] = None
    assert after == host_before


# ------------------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compose")


@pytest.fixture(scope="module")
def torchrun_allreduce(runs: Path) -> Path:
    out = runs / "torchrun-allreduce"
    train(out, *DAD_JOB, "comm.strategy=allreduce", nproc=2)
    return out


@pytest.fixture(scope="module")
def two_nodes(runs: Path) -> Path:
    out = runs / "two-nodes-dad"
    report = _cluster(out, "--nodes", "2", sets=DAD_JOB)
    assert report["exit_codes"] == [0, 0] and report["restarts"] == [0, 0]
    return out


@pytest.fixture(scope="module")
def four_nodes_killed(runs: Path) -> tuple[Path, dict]:
    out = runs / "four-nodes-dad-killed"
    cmd = _cluster_cmd(out, "--nodes", "4", sets=DAD_JOB)
    tool = subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
    try:
        killed_at, deadline = None, time.monotonic() + 600
        volume = _job_dir(deadline, tool)
        while volume and time.monotonic() < deadline and tool.poll() is None and killed_at is None:
            saved = [p for p in (volume / "checkpoints").glob("step_*") if p.suffix != ".partial"]
            if saved:  # a complete checkpoint to resume from
                rows = (volume / METRICS_FILE).read_text().count("\n") if (volume / METRICS_FILE).exists() else 0
                assert _docker("kill", f"{PROJECT}-node3").returncode == 0
                killed_at = rows
            time.sleep(0.2)
        _, err = tool.communicate(timeout=600)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert killed_at is not None, f"never saw a checkpoint to kill after:\n{err[-3000:]}"
    assert tool.returncode == 0, err[-4000:]
    return out, {"rows_at_kill": killed_at, "stderr": err}


@pytest.fixture(scope="module")
def two_nodes_capped(runs: Path) -> dict:
    return _cluster(runs / "two-nodes-capped", "--nodes", "2", "--rate", "100mbit", sets=CAPPED_JOB)


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.docker
@needs_docker
def test_dad_on_two_nodes_equals_torchrun_allreduce(two_nodes: Path, torchrun_allreduce: Path):
    report = _report(two_nodes)
    assert report["summary"][WORLD_SIZE] == 2 and report["summary"][STEPS] == DAD_STEPS
    assert max_rel_diff(model_state(torchrun_allreduce), model_state(two_nodes)) < 1e-5
    assert (two_nodes.with_name(two_nodes.name + ".compose-logs") / "node1.log").exists()


@pytest.mark.docker
@needs_docker
def test_four_nodes_with_one_killed_mid_run_end_with_the_uninterrupted_model(
    four_nodes_killed, two_nodes: Path, torchrun_allreduce: Path
):
    out, seen = four_nodes_killed
    report = _report(out)
    assert report["exit_codes"] == [0] * 4 and report["restarts"] == [0, 0, 0, 1], report
    assert report["summary"][WORLD_SIZE] == 4 and report["summary"][STEPS] == DAD_STEPS
    assert 0 < seen["rows_at_kill"] < DAD_STEPS, "killed mid-run"
    assert "node3 died (exit 137); restarted it" in seen["stderr"]
    assert "resumed from" in (out.with_name(out.name + ".compose-logs") / "node0.log").read_text()
    assert max_rel_diff(model_state(two_nodes), model_state(out)) < 1e-5
    assert max_rel_diff(model_state(torchrun_allreduce), model_state(out)) < 1e-5


@pytest.mark.docker
@needs_docker
def test_two_nodes_capped_at_100mbit_sync_at_that_rate(two_nodes_capped: dict):
    summary = two_nodes_capped["summary"]
    assert two_nodes_capped["exit_codes"] == [0, 0] and summary[WORLD_SIZE] == 2
    # each node's upload is capped, and all-reduce has every node send its wire bytes: sync takes their time
    # at the rate, plus TCP/IP headers (~7%, docs/launch.md), per-message latency and waiting for the peer
    needed = summary[COMM_WIRE_BYTES_PER_STEP] * 8 / RATE_BITS
    assert 0.9 <= summary[COMM_TIME_PER_STEP_S] / needed <= 1.3, (summary[COMM_TIME_PER_STEP_S], needed)


@pytest.mark.docker
@needs_docker
def test_ctrl_c_stops_the_job_and_removes_containers_network_and_volume(runs: Path):
    out = runs / "two-nodes-interrupted"
    private = not _engine_module().Engine().reachable()  # then the tool starts its own daemon and must stop it
    dockerd_before = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    # a job far longer than the test, in a process group of its own as a terminal's foreground job; started with
    # SIGINT ignored, as a background job of a script or CI runner starts everything: the tool must install its
    # own handler (netns_cluster's Ctrl-C test has the story)
    cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"']
    cmd += _cluster_cmd(out, "--nodes", "2", sets=("train.steps=100000", "eval.every=0", "checkpoint.every=0"))
    tool = subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        volume = _job_dir(deadline, tool)
        while volume and time.monotonic() < deadline and tool.poll() is None:
            if (volume / METRICS_FILE).exists() and (volume / METRICS_FILE).read_text().count("\n"):
                break  # both nodes are training: a metrics row needs a synchronised step
            time.sleep(0.2)
        training = tool.poll() is None and volume is not None and time.monotonic() < deadline
        if training:
            os.killpg(tool.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        _, err = tool.communicate(timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert training, f"the job never started training:\n{err[-3000:]}"
    assert tool.returncode == 130, err[-4000:]
    lines = err.strip().splitlines()
    assert lines[-1] == "compose_cluster: interrupted; containers, network and volume removed", err[-3000:]
    assert sum("interrupted" in ln for ln in lines) == 1, err[-3000:]
    dockerd_after = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    assert dockerd_after == dockerd_before, "the private dockerd was left running"
    assert not (private and PRIVATE_SOCKET.exists()), f"{PRIVATE_SOCKET} left behind"
    label = f"label=com.docker.compose.project={PROJECT}"
    with _daemon_as_left(private) as engine:
        containers = engine.docker("ps", "-a", "-q", "--filter", label).stdout.split()
        networks = engine.docker("network", "ls", "-q", "--filter", label).stdout.split()
        volumes = engine.docker("volume", "ls", "-q", "--filter", label).stdout.split()
    assert (containers, networks, volumes) == ([], [], []), "left on the daemon: containers, networks, volumes"

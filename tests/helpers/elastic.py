"""An elastic job of torchrun agents on loopback (launch/torchrun_multinode.sh with NNODES=MIN:MAX): start agents,
find a worker that stopped itself (DTRAIN_FAULT=stop@...), lose an agent for good, add one while the job runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers.launch import ROOT, TINY, env
from tests.helpers.ranks import free_port

SCRIPT = ROOT / "launch" / "torchrun_multinode.sh"


def stop_after(step: int) -> str:
    """DTRAIN_FAULT that SIGSTOPs the worker after its update `step`, whichever global rank it was given (the
    rendezvous assigns ranks, so which node holds rank 0 is not known in advance)."""
    return f"stop@train:step={step},rank=0;stop@train:step={step},rank=1"


class ElasticJob:
    """Agents of one c10d job (`--nnodes min_nodes:max_nodes`, one worker each) training `config` into
    `run_dir`; each agent's output goes to `run_dir.parent / agent<i>.log`."""

    def __init__(self, run_dir: Path, *overrides: str, config: str = TINY, nodes: str = "1:2") -> None:
        self.run_dir, self.overrides, self.config, self.nodes = run_dir, overrides, config, nodes
        self.port = free_port()
        self.agents: list[subprocess.Popen] = []

    def log(self, node: int) -> Path:
        return self.run_dir.parent / f"agent{node}.log"

    def start(self, node: int, **extra_env: str) -> subprocess.Popen:
        """Start the agent of `node` (node 0 hosts the rendezvous and outlives the others)."""
        cmd = [str(SCRIPT), self.config, "--set", f"run.dir={self.run_dir}", *self.overrides]
        agent = subprocess.Popen(
            cmd,
            cwd=ROOT,
            start_new_session=True,  # killpg reaches the agent and its workers
            stdout=self.log(node).open("w"),
            stderr=subprocess.STDOUT,
            env=env(
                NNODES=self.nodes,
                NODE_RANK=str(node),
                NPROC="1",
                MASTER_ADDR="127.0.0.1",
                PORT=str(self.port),
                JOB_ID=f"elastic-{self.port}",
                MAX_RESTARTS="2",
                # a lost node is noticed by its missing heartbeat; the rendezvous then waits this long for others
                RDZV_CONF="last_call_timeout=3",
                **extra_env,
            ),
        )
        self.agents.append(agent)
        return agent

    def wait_for_stopped_worker(self, agent: subprocess.Popen, timeout: float = 240) -> int:
        """The pid of the stopped (SIGSTOP) process among `agent`'s descendants, once there is one."""
        return _poll(lambda: _stopped_descendant(agent.pid), timeout, f"no stopped worker under agent {agent.pid}")

    def wait_for_log(self, node: int, text: str, timeout: float = 240) -> None:
        _poll(lambda: text in self.log(node).read_text(), timeout, f"{text!r} never appeared in {self.log(node)}")

    def kill(self, agent: subprocess.Popen) -> None:
        """The node is lost for good: its agent and every process it started, SIGKILLed."""
        for pid in _descendants(agent.pid):
            _signal(pid, signal.SIGKILL)
        _signal(agent.pid, signal.SIGKILL)
        agent.wait()

    def wait(self, agent: subprocess.Popen, timeout: float = 300) -> int:
        return agent.wait(timeout=timeout)

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                self.kill(agent)

    def output(self) -> str:
        return "".join(self.log(i).read_text() for i in range(len(self.agents)))


def _poll(probe, timeout: float, failure: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(failure)


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (state, parent pid) of every process, read from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        out[int(entry.name)] = (fields[0], int(fields[1]))
    return out


def _descendants(root: int) -> list[int]:
    procs = _processes()

    def under(pid: int) -> bool:
        while pid > 1:
            pid = procs.get(pid, ("", 0))[1]
            if pid == root:
                return True
        return False

    return [pid for pid in procs if under(pid)]


def _stopped_descendant(root: int) -> int | None:
    procs = _processes()
    return next((pid for pid in _descendants(root) if procs.get(pid, ("",))[0] == "T"), None)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

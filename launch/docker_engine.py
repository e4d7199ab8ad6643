"""The docker engine a compose cluster runs on: its packages, installed with apt-get (as root) when missing, and a
daemon: the one the environment reaches (DOCKER_HOST, or the default socket), else a private dockerd started for
the job and stopped after it.

The private daemon leaves the host's network as it was: no iptables or ip6tables rules (--iptables=false,
--ip6tables=false), no docker0 bridge (--bridge=none), no change to net.ipv4.ip_forward (--ip-forward=false), no
masquerading. What a job's compose network adds (a br-* bridge and one veth per container) goes when the job's
project is taken down. It has its own data root (images stay cached there from one run to the next), exec root,
socket and pidfile, and whatever it leaves mounted under them when it stops is unmounted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from netns_cluster import SetupError

# Stable across runs so the second run finds its images; DTRAIN_DOCKER_ROOT moves it.
STATE = Path(os.environ.get("DTRAIN_DOCKER_ROOT", "/var/lib/dtrain-docker"))
EXEC_ROOT = Path("/run/dtrain-docker")  # short: containerd's socket paths under it must fit in 108 bytes
SOCKET = EXEC_ROOT / "docker.sock"
PIDFILE = EXEC_ROOT / "dockerd.pid"
# command -> the Debian package that provides it
PACKAGES = {
    "docker": "docker.io",
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
}
PRIVATE_DAEMON_FLAGS = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--bridge=none",
)


def install_missing(commands: tuple[str, ...]) -> list[str]:
    """apt-get the packages of the commands not on PATH; returns the packages installed."""
    packages = sorted({PACKAGES[c] for c in commands if shutil.which(c) is None})
    if not packages:
        return []
    if os.geteuid() != 0:
        raise SetupError(f"{', '.join(packages)} not installed: install them, or rerun as root to have them installed")
    if shutil.which("apt-get") is None:
        raise SetupError(f"{', '.join(packages)} not installed and no apt-get to install them with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return packages


class Engine:
    """A reachable docker daemon for the length of a `with` block; `env` points docker and docker-compose at it."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.private: subprocess.Popen | None = None

    def docker(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        # its own session, as every command of the teardown: a Ctrl-C in the terminal reaches the tool only
        proc = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, start_new_session=True, **kw
        )
        if check and proc.returncode:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()[-3000:]}")
        return proc

    def reachable(self) -> bool:
        return self.docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=60).returncode == 0

    def __enter__(self) -> Engine:
        if not self.reachable():
            self._start_private()
        return self

    def __exit__(self, *exc) -> None:
        if self.private is not None:
            self._stop_private()

    # ------------------------------------------------------------------------------------------ private daemon
    def _start_private(self) -> None:
        if os.geteuid() != 0:
            raise SetupError(
                "no docker daemon reachable (DOCKER_HOST, /var/run/docker.sock): rerun as root to start one"
            )
        _stop_stale_daemon()
        STATE.mkdir(parents=True, exist_ok=True)
        EXEC_ROOT.mkdir(parents=True, exist_ok=True)
        cmd = [
            "dockerd",
            "--data-root",
            str(STATE / "root"),
            "--exec-root",
            str(EXEC_ROOT / "exec"),
            "--host",
            f"unix://{SOCKET}",
            "--pidfile",
            str(PIDFILE),
            *PRIVATE_DAEMON_FLAGS,
        ]
        with open(STATE / "dockerd.log", "w") as log:
            # its own session: a Ctrl-C in the terminal must reach the job, not the daemon it is torn down with
            self.private = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.env["DOCKER_HOST"] = f"unix://{SOCKET}"
        deadline = time.monotonic() + 60
        while not self.reachable():
            if self.private.poll() is not None or time.monotonic() > deadline:
                self._stop_private()
                raise RuntimeError(f"dockerd did not start; see {STATE / 'dockerd.log'}")
            time.sleep(0.5)
        self._prune()  # what a crashed run left: its networks would otherwise bring their bridges back

    def _prune(self) -> None:
        """Remove every stopped container, unused network and volume: all of them are ours on a private daemon."""
        for kind in ("container", "network"):
            self.docker(kind, "prune", "-f", check=False)
        # named volumes too: daemons of API 1.42+ (docker 23) prune them only with --all, which older ones refuse
        if self.docker("volume", "prune", "-f", "--all", check=False).returncode:
            self.docker("volume", "prune", "-f", check=False)

    def _stop_private(self) -> None:
        if self.private.poll() is None:
            self._prune()  # in case the job's own teardown failed: no bridge or veth may outlive the daemon
        _terminate(self.private.pid, self.private)
        self.private = None
        unmount_under(STATE, EXEC_ROOT)
        shutil.rmtree(EXEC_ROOT, ignore_errors=True)


def _terminate(pid: int, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM (dockerd stops its containerd and unmounts its data root), then SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.2)


def _stop_stale_daemon() -> None:
    """A private dockerd left by a crashed run (its pidfile names a live dockerd) is stopped first."""
    try:
        pid = int(PIDFILE.read_text())
        alive = Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except (OSError, ValueError):
        return
    if alive:
        _terminate(pid)
    unmount_under(STATE, EXEC_ROOT)


def unmount_under(*roots: Path) -> None:
    """Unmount what is still mounted under the roots, deepest first (a daemon killed before it could clean up)."""
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f]
    under = [t for t in targets if any(t == str(root) or t.startswith(f"{root}/") for root in roots)]
    for target in sorted(set(under), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)

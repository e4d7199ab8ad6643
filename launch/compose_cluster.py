"""A docker-compose cluster of N nodes on one machine, each a container running one torchrun agent of a `dtrain train`
job, on a private network with optional per-node rate caps; built and run offline, torn down afterwards.

    sudo launch/compose_cluster --nodes 2 --rate 100mbit -- \
        --config configs/quickstart.yaml --set comm.strategy=rankdad run.dir=runs/compose-rankdad

What it needs and sets up (docker_engine.py, docker_images.py): docker.io, docker-compose and debootstrap
(apt-get as root when missing); a docker daemon (the reachable one, else a private dockerd that changes nothing
on the host's network and is stopped afterwards); the images dtrain-base:bookworm (debootstrap) and dtrain:cpu
(docker/Dockerfile with the host's torch wheel), built when missing or when the sources changed, cached in the
daemon's data root.

The project: docker/docker-compose.yml's node service, network and volume, repeated for nodes node0 ... node{N-1}
with addresses SUBNET.(10+i) on a pinned /24 that is `internal` (no NAT, no published ports: the job reaches its
own nodes only). Every node runs `dtrain train --config /job/config.yaml --resume`, where config.yaml is the
config the dtrain arguments give (their --set overrides applied, run.dir on the shared `runs` volume), so the
nodes need only the image. --resume makes a node that restarts rejoin from the last checkpoint, as torchrun's own
restarts do; a fresh volume has none, so the job starts at step 0. With --rate, each node's entrypoint caps its
eth0 egress (tc tbf; `cap_add: NET_ADMIN`), so every byte a node sends or receives crossed a capped link.

Node loss: a container that dies of a signal (`docker kill`, the OOM killer: exit code >= 128) while other nodes
still run is started again, at most --max-restarts times; torchrun's --max-restarts on the other nodes restarts
their workers, and all rejoin the rendezvous. A node that fails by itself (torchrun exits 1) ends the job.

Output, as dtrain would have written it on the host (the run directory the dtrain arguments give, or --out OUT):
    OUT/                     the run directory, copied from the shared volume
    OUT.compose.json         nodes, rate, subnet, exit codes, restarts, set-up and job times, the run's summary
    OUT.compose-logs/nodeI.log   each node's output (all its starts)
Exit code: the job's (the first failed node's, else 0); 2 with one line for bad arguments or a missing
prerequisite; 130 after Ctrl-C or SIGTERM. Containers, the network and the volume are removed in every case.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netns_cluster as netns
import yaml
from docker_engine import Engine, install_missing
from docker_images import IMAGE, ROOT, ensure_base, ensure_image
from netns_cluster import SetupError, rate_bits, resolve_run_dir, split_at_dashes

COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
RDZV_PORT = 29400
JOB_CONFIG = "/job/config.yaml"
JOB_DIR = "/runs/job"
NEEDS = ("docker", "dockerd", "docker-compose", "debootstrap")


def job_config(dtrain_args: list[str], world_size: int) -> str:
    """The config the nodes run, as YAML: the arguments' config file and overrides, with run.dir on the volume."""
    from dtrain.cli import _build_parser
    from dtrain.config import ConfigError, check_world_size, dump_config, load_config

    args = _build_parser().parse_args(["train", *dtrain_args])  # resolve_run_dir has checked they parse
    try:
        cfg = load_config(args.config, [*(args.overrides or []), f"run.dir={JOB_DIR}"])
        check_world_size(cfg, world_size)
    except ConfigError as err:
        raise SetupError(str(err)) from None
    return dump_config(cfg)


def node_addr(subnet: str, i: int) -> str:
    return f"{subnet}.{10 + i}"  # .1 is the bridge's own address


def node_command(i: int, nodes: int, nproc: int, subnet: str, project: str, max_restarts: int) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={i}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={node_addr(subnet, 0)}:{RDZV_PORT}",
        f"--rdzv-id={project}",
        f"--rdzv-conf=is_host={1 if i == 0 else 0}",
        f"--max-restarts={max_restarts}",
        "-m",
        "dtrain",
        "train",
        "--config",
        JOB_CONFIG,
        "--resume",
    ]


def compose_project(args) -> dict:
    """docker/docker-compose.yml's node, network and volume for args.nodes nodes (one definition of a node)."""
    static = yaml.safe_load(COMPOSE_FILE.read_text())
    template = static["services"]["node0"]
    ((net_name, network),) = static["networks"].items()
    services = {}
    for i in range(args.nodes):
        node = {k: v for k, v in template.items() if k not in ("build", "command", "depends_on", "networks")}
        node.update(
            image=IMAGE,
            hostname=f"node{i}",
            container_name=f"{args.project}-node{i}",
            environment={**template["environment"], "DTRAIN_RATE": args.rate or ""},
            volumes=[*template["volumes"], f"./config.yaml:{JOB_CONFIG}:ro"],
            networks={net_name: {"ipv4_address": node_addr(args.subnet, i)}},
            command=node_command(i, args.nodes, args.nproc_per_node, args.subnet, args.project, args.max_restarts),
        )
        services[f"node{i}"] = node
    network = dict(network, ipam={"config": [{"subnet": f"{args.subnet}.0/24"}]})
    return {"services": services, "networks": {net_name: network}, "volumes": static["volumes"]}


# ---------------------------------------------------------------------------------------------- the job
class Job:
    """The compose project of one run: up, watched until every node has exited, copied out, taken down."""

    def __init__(self, engine: Engine, project_dir: Path, args) -> None:
        self.engine, self.args = engine, args
        self.names = [f"{args.project}-node{i}" for i in range(args.nodes)]
        self.compose = ["docker-compose", "-p", args.project, "-f", str(project_dir / "docker-compose.yml")]

    def _compose(self, *args: str) -> None:
        # its own session: a Ctrl-C in the terminal must not cut the teardown short
        proc = subprocess.run(
            [*self.compose, *args], env=self.engine.env, capture_output=True, text=True, start_new_session=True
        )
        if proc.returncode:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {proc.stderr.strip()[-3000:]}")

    def down(self) -> None:
        self._compose("down", "--volumes", "--remove-orphans", "--timeout", "5")

    def states(self) -> list[tuple[str, int]]:
        # one docker process for all nodes, twice a second: on 2 cores, one per node took CPU from the job
        fmt = "{{.State.Status}} {{.State.ExitCode}}"
        rows = [line.split() for line in self.engine.docker("inspect", "-f", fmt, *self.names).stdout.splitlines()]
        return [(status, int(code)) for status, code in rows]

    def run(self) -> tuple[list[int], list[int]]:
        """Start the nodes and wait for all of them; (final exit codes, restarts per node)."""
        if netns._stop_signal is not None:  # Ctrl-C/SIGTERM during set-up (a step that ran on): start nothing
            raise KeyboardInterrupt
        self._compose("up", "--detach", "--no-build")
        restarts = [0] * len(self.names)
        deadline = time.monotonic() + self.args.timeout
        while netns._stop_signal is None:
            states = self.states()
            running = [status == "running" for status, _ in states]
            if not any(running) or time.monotonic() > deadline:
                break
            for i, (status, code) in enumerate(states):
                lost = status == "exited" and code >= 128  # killed by a signal, not failed by itself
                if lost and restarts[i] < self.args.max_restarts and any(running):
                    self.engine.docker("start", self.names[i])
                    restarts[i] += 1
                    print(f"compose_cluster: node{i} died (exit {code}); restarted it", file=sys.stderr)
            time.sleep(0.5)
        if netns._stop_signal is None and time.monotonic() > deadline:
            print(f"compose_cluster: --timeout {self.args.timeout:g} s reached; stopping the job", file=sys.stderr)
            self._compose("kill")
        if netns._stop_signal is not None:
            raise KeyboardInterrupt
        return [code if status == "exited" else -1 for status, code in self.states()], restarts

    def collect(self, out: Path) -> None:
        """Each node's log, and the run directory from the shared volume when the job made one."""
        log_dir = out.with_name(out.name + ".compose-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(self.names):
            logs = self.engine.docker("logs", name, check=False)
            (log_dir / f"node{i}.log").write_text(logs.stdout + logs.stderr)
        if self.engine.docker("cp", f"{self.names[0]}:{JOB_DIR}/.", str(out), check=False).returncode:
            print(f"compose_cluster: no run directory to copy from {JOB_DIR}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    own, dtrain_args = split_at_dashes(argv)
    p = argparse.ArgumentParser(
        prog="launch/compose_cluster",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- DTRAIN_TRAIN_ARGS",
    )
    p.add_argument("--nodes", type=int, default=2, help="number of node containers, default 2")
    p.add_argument("--nproc-per-node", type=int, default=1, help="torchrun workers per node, default 1")
    p.add_argument("--rate", help="per-node egress cap, e.g. 100mbit (tc tbf in the container); default: none")
    p.add_argument("--out", type=Path, help="where the run directory goes; default: the one the dtrain arguments give")
    p.add_argument("--project", default="dtrain", help="compose project name and rendezvous id, default dtrain")
    p.add_argument("--subnet", default="10.79.0", help="first three octets of the private /24, default 10.79.0")
    p.add_argument("--max-restarts", type=int, default=1, help="restarts per node (and torchrun's), default 1")
    p.add_argument("--timeout", type=float, default=3600, help="stop the job after this many seconds")
    args = p.parse_args(own)
    if not dtrain_args:
        p.error("no dtrain arguments: add `-- --config FILE [--set ...]`")  # usage, exit 2
    try:
        if args.nodes < 1 or args.nproc_per_node < 1 or args.max_restarts < 0:
            raise SetupError("--nodes and --nproc-per-node must be at least 1, --max-restarts at least 0")
        if not re.fullmatch(r"(\d{1,3}\.){2}\d{1,3}", args.subnet) or args.nodes > 240:
            raise SetupError(f"--subnet {args.subnet!r}: expected three octets like 10.79.0 (and at most 240 nodes)")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,19}", args.project):
            raise SetupError(f"--project {args.project!r}: 1-20 lowercase letters/digits, starting with a letter")
        if args.rate:
            rate_bits(args.rate)
        world = args.nodes * args.nproc_per_node
        host_run_dir = resolve_run_dir(dtrain_args, world)  # also checks that the dtrain arguments parse
        out = (args.out or host_run_dir).resolve()
        config = job_config(dtrain_args, world)
    except SetupError as err:
        print(f"compose_cluster: error: {err}", file=sys.stderr)
        return 2

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, netns._request_stop)
    report = {"nodes": args.nodes, "nproc_per_node": args.nproc_per_node, "world_size": world, "rate": args.rate}
    report.update(subnet=f"{args.subnet}.0/24", project=args.project, image=IMAGE, run_dir=str(out))
    t0 = time.monotonic()
    try:
        report["installed"] = install_missing(NEEDS)
        with Engine() as engine, tempfile.TemporaryDirectory(prefix="dtrain-compose-") as tmp:
            report["daemon"] = "private" if engine.private else engine.env.get("DOCKER_HOST", "default")
            print("compose_cluster: images (a first build takes a few minutes)", file=sys.stderr)
            report["built"] = {"base": ensure_base(engine), "image": ensure_image(engine)}
            project_dir = Path(tmp)
            (project_dir / "config.yaml").write_text(config)
            (project_dir / "docker-compose.yml").write_text(yaml.safe_dump(compose_project(args), sort_keys=False))
            job = Job(engine, project_dir, args)
            job.down()  # what a crashed run of this project left
            report["setup_s"] = time.monotonic() - t0
            print(f"compose_cluster: starting {args.nodes} nodes ({args.project}-node0 ...)", file=sys.stderr)
            try:
                t1 = time.monotonic()
                codes, restarts = job.run()
                report["job_s"] = time.monotonic() - t1
                job.collect(out)
            finally:
                job.down()
    except SetupError as err:
        print(f"compose_cluster: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RuntimeError) as err:
        if netns._stop_signal is not None:  # also a step that Ctrl-C cut short (a build, debootstrap)
            print("compose_cluster: interrupted; containers, network and volume removed", file=sys.stderr)
            return 130
        print(f"compose_cluster: failed: {err}", file=sys.stderr)
        return 1
    code = next((c for c in codes if c != 0), 0)
    summary = out / "summary.json"
    report.update(exit_codes=codes, restarts=restarts, exit_code=code)
    report["summary"] = json.loads(summary.read_text()) if code == 0 and summary.exists() else None
    report_path = out.with_name(out.name + ".compose.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "done" if code == 0 else "FAILED"
    print(f"compose_cluster: {verdict}, exit codes {codes}, restarts {restarts}; {out}, {report_path}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

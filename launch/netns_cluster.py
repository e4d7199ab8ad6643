"""A cluster of N hosts on one machine: network namespaces on a private switch, optional per-host rate caps,
and one torchrun agent per host running `dtrain train`.

    launch/netns_cluster --hosts 2 --nproc-per-host 1 --rate 100mbit -- \
        --config configs/quickstart.yaml --set comm.strategy=rankdad run.dir=runs/netns-rankdad

Topology: namespaces PREFIX-h0 ... PREFIX-h{N-1}, each with `eth0` = SUBNET.(i+1)/24, the other end of each
veth pair plugged into a bridge that lives in its own namespace PREFIX-sw (so nothing is added to the
machine's own network). No namespace has a default route: the job can only reach addresses created here.
With --rate, a tbf qdisc caps both directions of every host's link (eth0 egress = upload, the switch port's
egress = download), like a NIC of that speed. netem is not used (not in every kernel), so no latency/loss.

Output, next to the run directory RUN (from the dtrain arguments, as dtrain itself resolves it):
    RUN.netns.json        hosts, rate, exit codes, per-host eth0 byte/packet counters over the job, and the
                          run's summary.json figures for comparison (wire bytes per step x steps)
    RUN.netns-logs/hostI.log   each host's torchrun output

Teardown (namespaces, their veths and the bridge, and every process left inside them) runs on success,
failure, timeout, Ctrl-C and SIGTERM; namespaces left by a crashed run with the same prefix are removed first.
Needs root (ip netns, tc); exits 2 with one line otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

IFACE = "eth0"
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class SetupError(RuntimeError):
    """Something the user can fix (not root, no `ip netns`, a bad argument): one line, exit 2."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _in_ns(ns: str, *cmd: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{ns}: {' '.join(cmd)}: {proc.stderr.strip()}")


def rate_bits(rate: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", rate.strip().lower())
    if not m:
        raise SetupError(f"--rate {rate!r}: expected a number with bit, kbit, mbit or gbit (e.g. 100mbit)")
    return int(float(m.group(1)) * RATE_UNITS[m.group(2)])


def check_environment() -> None:
    if os.geteuid() != 0:
        raise SetupError("netns_cluster needs root (ip netns, veth, tc); rerun with sudo")
    if shutil.which("ip") is None or _ip("netns", "list", check=False).returncode:
        raise SetupError("netns_cluster needs `ip netns` (iproute2) and network-namespace support")


class Cluster:
    def __init__(self, prefix: str, hosts: int, subnet: str, rate: str | None, burst: str | None) -> None:
        self.prefix, self.hosts, self.subnet = prefix, hosts, subnet
        self.rate, self.burst = rate, burst
        self.switch = f"{prefix}-sw"

    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def namespaces(self) -> list[str]:
        return [self.switch] + [self.ns(i) for i in range(self.hosts)]

    # ------------------------------------------------------------------------------------------ lifecycle
    @staticmethod
    def remove_stale(prefix: str) -> list[str]:
        """Delete namespaces named like ours (a crashed earlier run), killing what still runs inside."""
        listed = _ip("netns", "list").stdout.split("\n")
        ours = re.compile(rf"^{re.escape(prefix)}-(sw|h\d+)$")
        stale = [line.split()[0] for line in listed if line.split() and ours.match(line.split()[0])]
        for ns in stale:
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
        return stale

    def create(self) -> None:
        for ns in self.namespaces():
            _ip("netns", "add", ns)
            # no IPv6: its neighbour discovery would add unrelated packets to the link counters
            _in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
            _in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.hosts):
            port = f"p{i}"
            _ip("link", "add", IFACE, "netns", self.ns(i), "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", self.ns(i), "addr", "add", f"{self.addr(i)}/24", "dev", IFACE)
            _ip("-n", self.ns(i), "link", "set", IFACE, "up")
            if self.rate:
                for ns, dev in ((self.ns(i), IFACE), (self.switch, port)):
                    _in_ns(
                        ns,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        self.rate,
                        "burst",
                        self.tbf_burst(),
                        "latency",
                        "400ms",
                    )

    def tbf_burst(self) -> str:
        if self.burst:
            return self.burst
        # the bucket must hold at least a few full frames and about 1 ms at the rate, or tbf falls short of it
        return f"{max(rate_bits(self.rate) // 8 // 1000, 16 * 1024)}b"

    def destroy(self) -> None:
        for ns in self.namespaces():
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)  # removes its veth ends and the bridge with it

    def counters(self) -> list[dict]:
        """Per host: eth0's byte and packet counters, and with a cap its tbf's (overlimits > 0: it throttled)."""
        out = []
        for i in range(self.hosts):
            link = json.loads(_ip("-n", self.ns(i), "-s", "-j", "link", "show", IFACE).stdout)[0]["stats64"]
            row = {
                "tx_bytes": link["tx"]["bytes"],
                "rx_bytes": link["rx"]["bytes"],
                "tx_packets": link["tx"]["packets"],
                "rx_packets": link["rx"]["packets"],
            }
            if self.rate:
                tc = subprocess.run(
                    ["ip", "netns", "exec", self.ns(i), "tc", "-s", "-j", "qdisc", "show", "dev", IFACE],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                tbf = next(q for q in json.loads(tc.stdout) if q["kind"] == "tbf")
                row.update(tbf_overlimits=tbf["overlimits"], tbf_drops=tbf["drops"])
            out.append(row)
        return out


def _kill_namespace_processes(ns: str) -> None:
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.1)
        if not pids:
            return


# ---------------------------------------------------------------------------------------------- the job
def resolve_run_dir(dtrain_args: list[str], world_size: int) -> Path:
    """The run directory `dtrain train` will use for these arguments (the same rules, the same code)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dtrain.cli import _build_parser
    from dtrain.config import ConfigError, load_config
    from dtrain.rundir import default_run_dir

    try:
        args = _build_parser().parse_args(["train", *dtrain_args])
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SetupError(str(err)) from None
    except SystemExit:
        raise SetupError(f"invalid dtrain train arguments: {' '.join(dtrain_args)}") from None
    return default_run_dir(cfg, args.config, world_size).resolve()


def host_command(
    cluster: Cluster, i: int, nproc: int, port: int, job_id: str, max_restarts: int, dtrain_args: list[str]
) -> list[str]:
    # Each flag below is needed (env_notes §4): is_host=1 because host 0 does not know 10.x as "its" name;
    # --local-addr so workers get a reachable MASTER_ADDR; GLOO_SOCKET_IFNAME because the machine's hostname
    # resolves to 127.0.0.1 in every namespace. TORCH_DISABLE_SHARE_RDZV_TCP_STORE: a fresh store for every
    # round of the rendezvous (launch/torchrun_multinode.sh says why).
    return [
        "ip",
        "netns",
        "exec",
        cluster.ns(i),
        "env",
        f"GLOO_SOCKET_IFNAME={IFACE}",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(cluster.hosts),
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "--node-rank",
        str(i),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{cluster.addr(0)}:{port}",
        "--rdzv-id",
        job_id,
        "--local-addr",
        cluster.addr(i),
        "--rdzv-conf",
        f"is_host={1 if i == 0 else 0}",
        "-m",
        "dtrain",
        "train",
        *dtrain_args,
    ]


def run_hosts(commands: list[list[str]], logs: list[Path], timeout_s: float, grace_s: float) -> list[int | None]:
    """Start every host; when one fails, give the others `grace_s` to fail too, then stop them."""
    procs = []
    for cmd, log in zip(commands, logs):
        if _stop_signal is not None:  # Ctrl-C/SIGTERM during set-up: start nothing
            break
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        while _stop_signal is None and any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_s)
            time.sleep(0.2)
    finally:
        # one shared 10 s grace for every host (not 10 s each), then SIGKILL whatever is left
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        grace_end = time.monotonic() + 10
        while any(p.poll() is None for p in procs) and time.monotonic() < grace_end:
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs]


# Set by _request_stop (SIGINT or SIGTERM); run_hosts() stops the job when it sees it, main() then exits 130.
_stop_signal: int | None = None


def _request_stop(signum, frame):
    """Handler for SIGINT and SIGTERM, installed explicitly for both, and it only records the request.

    Explicitly for SIGINT too: Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when
    the interpreter started, and a command started as a background job of a non-interactive shell (`cmd &`
    in a script, a CI runner, `make test-all &`) inherits SIGINT ignored, as does everything it starts (pytest,
    then this tool). Ctrl-C was then silently ignored: the job kept training and the Ctrl-C test hit its
    120 s timeout, leaving the namespaces and the job behind (the intermittent "hang").
    Only a flag, no exception: a KeyboardInterrupt raised at an arbitrary bytecode can land inside
    Popen.poll() between its _waitpid_lock.acquire() and the try that releases it; the lock then stays
    held, poll() reports "running" for ever and the final p.wait() blocks for ever. A flag also means a
    second Ctrl-C cannot cut the teardown short.
    """
    global _stop_signal
    _stop_signal = signum


def split_at_dashes(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the `dtrain train` arguments after `--`) of a cluster launcher's command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main(argv: list[str] | None = None) -> int:
    own, dtrain_args = split_at_dashes(argv)
    p = argparse.ArgumentParser(
        prog="launch/netns_cluster",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- DTRAIN_TRAIN_ARGS",
    )
    p.add_argument("--hosts", type=int, default=2, help="number of namespaces (nodes), default 2")
    p.add_argument("--nproc-per-host", type=int, default=1, help="torchrun workers per host, default 1")
    p.add_argument("--rate", help="per-host link cap in both directions, e.g. 100mbit (tc tbf); default: none")
    p.add_argument("--burst", help="tbf bucket, e.g. 32kb; default: max(1 ms at the rate, 16 KiB)")
    p.add_argument("--prefix", default="dtn", help="namespace name prefix, default dtn (PREFIX-h0, PREFIX-sw)")
    p.add_argument("--subnet", default="10.77.0", help="first three octets of the private /24, default 10.77.0")
    p.add_argument("--port", type=int, default=29400, help="rendezvous port on host 0, default 29400")
    p.add_argument("--timeout", type=float, default=3600, help="stop the job after this many seconds")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun --max-restarts: after a failure (a peer unreachable for comm.timeout_s) the workers restart "
        "and resume from the last checkpoint; default 0",
    )
    args = p.parse_args(own)
    if not dtrain_args:
        p.error("no dtrain arguments: add `-- --config FILE [--set ...]`")  # usage, exit 2
    try:
        if args.hosts < 1 or args.nproc_per_host < 1 or args.max_restarts < 0:
            raise SetupError("--hosts and --nproc-per-host must be at least 1, --max-restarts at least 0")
        if not re.fullmatch(r"(\d{1,3}\.){2}\d{1,3}", args.subnet) or args.hosts > 250:
            raise SetupError(f"--subnet {args.subnet!r}: expected three octets like 10.77.0 (and at most 250 hosts)")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", args.prefix):
            raise SetupError(f"--prefix {args.prefix!r}: 1-10 lowercase letters/digits, starting with a letter")
        if args.rate:
            rate_bits(args.rate)
        check_environment()
        run_dir = resolve_run_dir(dtrain_args, args.hosts * args.nproc_per_host)
    except SetupError as err:
        print(f"netns_cluster: error: {err}", file=sys.stderr)
        return 2

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    cluster = Cluster(args.prefix, args.hosts, args.subnet, args.rate, args.burst)
    log_dir = run_dir.with_name(run_dir.name + ".netns-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"host{i}.log" for i in range(args.hosts)]
    job_id = f"{args.prefix}-{os.getpid()}"
    try:
        stale = Cluster.remove_stale(args.prefix)
        if stale:
            print(f"netns_cluster: removed stale namespaces {', '.join(stale)}", file=sys.stderr)
        cluster.create()
        before = cluster.counters()
        t0 = time.monotonic()
        commands = [
            host_command(cluster, i, args.nproc_per_host, args.port, job_id, args.max_restarts, dtrain_args)
            for i in range(args.hosts)
        ]
        codes = run_hosts(commands, logs, args.timeout, grace_s=30)
        if _stop_signal is not None:
            raise KeyboardInterrupt
        wall = time.monotonic() - t0
        after = cluster.counters()
    except KeyboardInterrupt:
        print(f"netns_cluster: interrupted; logs in {log_dir}", file=sys.stderr)
        return 130
    finally:
        cluster.destroy()
    report = build_report(args, cluster, run_dir, codes, wall, before, after, logs)
    out = run_dir.with_name(run_dir.name + ".netns.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(c == 0 for c in codes)
    print(
        f"netns_cluster: {'done' if ok else 'FAILED'} in {wall:.1f} s, exit codes {codes}; report {out}; "
        f"logs {log_dir}",
        file=sys.stderr,
    )
    return 0 if ok else 1


def build_report(
    args,
    cluster: Cluster,
    run_dir: Path,
    codes: list[int | None],
    wall: float,
    before: list[dict],
    after: list[dict],
    logs: list[Path],
) -> dict:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and all(c == 0 for c in codes) else None
    hosts = []
    for i, (b, a) in enumerate(zip(before, after)):
        link = {k: a[k] - b[k] for k in a}
        host = {
            "host": i,
            "namespace": cluster.ns(i),
            "addr": cluster.addr(i),
            "exit_code": codes[i],
            "log": str(logs[i]),
            **link,
        }
        if summary and args.nproc_per_host == 1:
            # What dtrain says this host's rank put on the wire for gradient sync, all steps together. Only
            # with one rank per host: ranks on the same host talk over loopback, which eth0 never sees.
            reported = summary["comm/wire_bytes_per_step"] * summary["steps"]
            host["reported_wire_bytes"] = reported
            host["tx_over_reported"] = link["tx_bytes"] / reported if reported else None
        hosts.append(host)
    return {
        "hosts": args.hosts,
        "nproc_per_host": args.nproc_per_host,
        "world_size": args.hosts * args.nproc_per_host,
        "rate": args.rate,
        "tbf_burst": cluster.tbf_burst() if args.rate else None,
        "subnet": f"{args.subnet}.0/24",
        "run_dir": str(run_dir),
        "exit_codes": codes,
        "wall_s": wall,
        "links": hosts,
        "summary": summary,
    }


if __name__ == "__main__":
    sys.exit(main())

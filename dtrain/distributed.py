"""Process-group set-up for every way dtrain is launched, the control collectives, and rank liveness.

Process groups:
- plain `dtrain train` (no launcher): a world-size-1 gloo group on an in-memory store, so every strategy
  (DDP included) runs the same code path at world size 1;
- torchrun / `python -m torch.distributed.run`: RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment;
- the deepspeed launcher: the same variables, plus `--local_rank=N` on the command line (see cli.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size announced by a launcher, before any process group exists (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 300.0, local_rank: int | None = None) -> DistEnv:
    timeout = datetime.timedelta(seconds=timeout_s)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("DTRAIN_DEVICE", "") != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # NCCL refuses two ranks on one GPU; gloo on CUDA tensors still works there (DTRAIN_BACKEND=gloo).
    backend = os.environ.get("DTRAIN_BACKEND") or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent hosts the store and it outlives the workers. torch 2.13 no longer prefixes keys
            # per restart attempt, so restarted workers would read the dead workers' gloo addresses (connection
            # refused). Namespace the process group by attempt ourselves.
            client = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timeout,
                wait_for_workers=False,
            )
            store = dist.PrefixStore(f"dtrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
            dist.init_process_group(
                backend,
                store=store,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timeout,
            )
        elif "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = job_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def job_store(host: str, port: int, rank: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The job's store when dtrain hosts it (launchers that set MASTER_ADDR without an agent store, e.g. the
    deepspeed launcher). The store has no authentication, and torch's TCPStore server listens on every
    interface whatever host it is given; so rank 0 binds it to MASTER_ADDR itself when that is an IP address of
    this machine (a hostname, or an address behind NAT, keeps torch's every-interface listener). Under torchrun
    the agent hosts the store and dtrain cannot narrow it: docs/security.md."""
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout, multi_tenant=True)
    try:
        ipaddress.ip_address(host)
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (ValueError, OSError):  # not an IP literal, or not an address of this machine
        return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, multi_tenant=True)
    fd = listener.detach()  # the store owns the bound socket from here on
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, multi_tenant=True, master_listen_fd=fd)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- control collectives
# Every collective outside the gradient strategies (which go through compression.Comm) is one of the functions
# below: small control messages (flags, eval sums, checkpoint choice, replica checksums). Each is a no-op, or
# the identity, at world size 1 and without a process group. A test (tests/unit/test_collective_gate.py) keeps
# every other module from calling torch.distributed collectives itself.
#
# Control bytes: each of them charges its payload (elements x element size of every tensor this rank hands to
# the collective, as compression.Comm counts gradient payload) to a per-process counter that the trainer takes
# once per step (`take_control_bytes`, logged as comm/control_bytes). A barrier carries no payload (0 bytes).
# Collectives that run inside other libraries but whose size is known (DeepSpeed ZeRO-1's parameter all-gather)
# are charged with `count_control_bytes`.

_control_bytes = 0


def count_control_bytes(nbytes: int) -> None:
    """Charge `nbytes` of control payload sent by a collective outside this module (its size known)."""
    global _control_bytes
    _control_bytes += int(nbytes)


def take_control_bytes() -> int:
    """Control payload this process handed to collectives since the last call; restarts the count."""
    global _control_bytes
    taken, _control_bytes = _control_bytes, 0
    return taken


def _charge(t: torch.Tensor) -> None:
    count_control_bytes(t.numel() * t.element_size())


def group_world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a group's backend takes tensors: the CPU when it has a CPU backend (gloo, "cpu:gloo,cuda:nccl"),
    else the current CUDA device (nccl, or a CUDA-only group such as "cuda:gloo"). The one rule for control
    collectives here and for `compression.Comm`'s small host-side tensors (row counts)."""
    device_types = {spec.split(":")[0] for spec in dist.get_backend_config(group).split(",")}
    if "cpu" in device_types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _in_place_on_collective_device(t: torch.Tensor, collective: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Run `collective` on `t` where the backend needs it, leaving the result in `t` on the caller's device."""
    device = collective_device()
    if t.device == device:
        collective(t)
        return t
    moved = t.to(device)
    collective(moved)
    return t.copy_(moved)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if group_world_size() == 1:
        return t
    _charge(t)
    return _in_place_on_collective_device(t, lambda x: dist.all_reduce(x, op=op))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; returns `t`."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of `t` over ranks, in place; returns `t`."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of `t` over ranks, in place; returns `t`."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s `t`; returns `t`."""
    if group_world_size() == 1:
        return t
    _charge(t)
    return _in_place_on_collective_device(t, lambda x: dist.broadcast(x, src=src))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] at world size 1).

    As torch's all_gather_object, but with its payload counted: the pickled sizes travel first (one int64 per
    rank), then every rank's pickle padded to the largest, as uint8 tensors on the backend's device."""
    world = group_world_size()
    if world == 1:
        return [obj]
    device = collective_device()
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    _charge(size)
    dist.all_gather(sizes, size)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    padded = padded.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    _charge(padded)
    dist.all_gather(parts, padded)
    return [pickle.loads(part[:n].cpu().numpy().tobytes()) for part, n in zip(parts, lengths)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the other ranks' `obj` is ignored): its pickled size, then
    the pickle, as tensors on the backend's device, counted as control bytes. Unlike an all-gather, each rank
    receives one copy whatever the world size."""
    if group_world_size() == 1:
        return obj
    device = collective_device()
    data = pickle.dumps(obj) if dist.get_rank() == src else b""
    size = broadcast_(torch.tensor([len(data)], dtype=torch.int64, device=device), src)
    payload = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        payload[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    payload = broadcast_(payload.to(device), src)
    return pickle.loads(payload.cpu().numpy().tobytes())


def run_on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 only, its result handed to every rank. A `ConfigError` that `fn` raises is raised on
    every rank (with the same one-line message), so no rank waits for a result that will never come."""
    from .config import ConfigError

    if group_world_size() == 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except ConfigError as err:
            outcome = ("config", str(err))
        except Exception as err:  # any other failure: the other ranks stop too instead of waiting
            outcome, failure = ("crash", f"{type(err).__name__}: {err}"), err
    kind, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "config":
        raise ConfigError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    """Wait until every rank got here."""
    if group_world_size() > 1:
        dist.barrier()


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` is True on every rank (a 1-int MAX all-reduce of `not flag`)."""
    return int(all_reduce_max(torch.tensor([0 if flag else 1], dtype=torch.int32)).item()) == 0


class PeerUnresponsive(RuntimeError):
    """A collective failed or timed out; the message names the ranks that stopped making progress."""


_STORE_UNREACHABLE = (
    "the rendezvous store on rank 0's host is unreachable from this rank: rank 0 or the link to it is down"
)


class Heartbeat:
    """Liveness of every rank, through the job's c10d store.

    A daemon thread writes "<step this rank is working on> <time>" every `interval_s` through a store client of
    its own. A rank blocked in a collective keeps beating; a stopped process, a dead host or a link that went
    down stops. So when a collective times out, the ranks whose beats stopped can be named, instead of only
    "timed out".
    """

    def __init__(self, env: DistEnv, interval_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.rank, self.world_size, self.interval_s = env.rank, env.world_size, interval_s
        self.step = 0
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if env.world_size > 1 and "MASTER_ADDR" in os.environ:
            self._prefix = f"dtrain/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            self._thread = threading.Thread(target=self._run, name="dtrain-heartbeat", daemon=True)
            self._thread.start()

    def _client(self) -> dist.Store:
        # a client of its own with a short timeout: the process group's store keeps its own settings
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=self._timeout,
            wait_for_workers=False,
        )
        return dist.PrefixStore(self._prefix, client)

    def _run(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                store = store or self._client()
                store.set(str(self.rank), f"{self.step} {time.time():.3f}")
            except Exception:  # noqa: BLE001 - store unreachable for now: try again next beat
                store = None
            self._stop.wait(self.interval_s)

    def beat(self, step: int) -> None:
        """Record the step this rank is working on (the thread publishes it)."""
        self.step = step

    def close(self) -> None:
        """Stop beating and wait for the thread: a daemon thread still inside a store call when the interpreter
        shuts down is killed mid-C++ frame, which aborts the process at exit."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._timeout.total_seconds() + self.interval_s)

    def diagnose(self, step: int) -> str:
        """One sentence on which ranks stopped beating (never raises)."""
        if self._thread is None:
            return "no peers"
        try:
            store = self._client()
        except Exception:  # noqa: BLE001
            return _STORE_UNREACHABLE
        silent_after = 3 * self.interval_s + 2.0
        now = time.time()
        silent, behind = [], []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if not store.check([str(r)]):
                    silent.append(f"rank {r} (never sent a heartbeat)")
                    continue
                last_step, stamp = store.get(str(r)).decode().split()
            except Exception:  # noqa: BLE001 - the store itself is unreachable
                return _STORE_UNREACHABLE
            age = now - float(stamp)
            if age > silent_after:
                silent.append(f"rank {r} (no heartbeat for {age:.0f} s, was on step {last_step})")
            elif int(last_step) < step:
                behind.append(f"rank {r} (alive, still on step {last_step})")
        if silent:
            return "unresponsive: " + ", ".join(silent)
        if behind:
            return "behind: " + ", ".join(behind)
        return f"every peer is alive and on step {step}; the failure happened inside it"


def is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(
        s in text
        for s in (
            "Timed out",
            "timed out",
            "Connection closed by peer",
            "Connection reset",
            "pair closure",  # gloo: "Application timeout caused pair closure", a peer silent past the timeout
            "Gloo",
            "NCCL",
            "Broken pipe",
        )
    )

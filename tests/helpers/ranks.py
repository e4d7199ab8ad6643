"""Run a function on N real gloo processes and collect what each rank returns; cache named scenarios."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

T = TypeVar("T")

# Ranks are forked from a forkserver that imported these once, instead of each new rank importing them (seconds
# per rank on 2 cores: torch; torch._dynamo, which DistributedDataParallel imports at its first construction). The
# server is a clean process started by the first run: a rank inherits nothing of the pytest process but its
# sys.path, and its environment as it was then.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "pytest",
    "dtrain.compression",
    "dtrain.model",
    "tests.helpers.models",
    "tests.helpers.oracles",
]
mp.set_forkserver_preload(_PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, backend: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result: Any = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _rank_errors(out_dir: str) -> str:
    """Every rank's traceback, the first to fail first (the others usually fail because a peer went away)."""
    paths = sorted(Path(out_dir).glob("*.error"), key=lambda p: p.stat().st_mtime_ns)
    return "".join(f"\n-- rank {p.stem}:\n{p.read_text()}" for p in paths)


def run_ranks(fn: Callable, world: int, *args: Any, backend: str = "gloo", timeout_s: float = 300) -> list[Any]:
    """fn(rank, world, *args) on `world` new processes of a `backend` process group; returns the per-rank
    results (must be picklable by torch.save).

    `fn` must be a module-level function: a rank imports its module by name (a test module is importable as
    `tests.distributed.test_x`: the ranks get this process's sys.path). A rank that raises or dies fails the call
    with every failed rank's traceback (or the exit signal); ranks still running after `timeout_s` are killed."""
    label = f"{getattr(fn, '__qualname__', fn)}{args!r} on {world} ranks"
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _worker,
            args=(world, free_port(), fn, args, out, backend),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{label}: still running after {timeout_s:.0f} s (a hang?)")
        except ProcessException as err:
            details = _rank_errors(out)
            if isinstance(err, ProcessExitedException) or not details:  # died without a traceback: a signal, exit()
                details = f"\n-- {err}{details}"
            raise AssertionError(f"{label} failed:{details}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def cached(run: Callable[..., T]) -> Callable[..., T]:
    """Memoise a scenario runner by its (hashable) arguments, failures included.

    Every test that reads a scenario reuses its one run; a scenario that failed fails each test that reads it
    with the same message, without running again. Decorate a function of (scenario name, world size) that calls
    `run_ranks`, and parametrize the tests by the scenario name, so a failure's test id names the scenario."""
    results: dict[tuple, tuple[bool, Any]] = {}

    @functools.wraps(run)
    def once(*key: Any) -> T:
        if key not in results:
            try:
                results[key] = (True, run(*key))
            except Exception as err:  # a KeyboardInterrupt is not cached
                results[key] = (False, f"{type(err).__name__}: {err}")
                raise
        ok, value = results[key]
        if not ok:
            raise AssertionError(f"{run.__name__}{key!r} failed in an earlier test: {value}")
        return value

    return once

"""Shared helpers of the benchmarks (bench/*.py, run as `python -m bench.NAME` from the repository root).

- `machine()` / `load()`: what ran the numbers, and how busy the machine was (load average), for the tables;
- `command_line()`: the command that produced them, as the docs record it;
- `train_run()`: one `dtrain train` through torchrun (or the netns cluster), its summary.json and metrics rows;
- `write_section()`: replace or append one "## " section of docs/benchmarks.md, leaving the others alone;
- `launch_script()`: a module of launch/, to use the launchers' own helpers instead of copies;
- `to_device()`: a task's batch on the device a benchmark runs its model on.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from dtrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TORCHRUN = str(VENV_BIN / "torchrun") if (VENV_BIN / "torchrun").exists() else "torchrun"
NETNS_CLUSTER = ROOT / "launch" / "netns_cluster"
CPU = torch.device("cpu")
INTRO = (
    "# Benchmarks\n\nMeasured figures, each with the command that produced it and the machine it ran on. "
    "Each benchmark is a module of the `bench` package, run from the repository root "
    "(`.venv/bin/python -m bench.NAME --help`); re-running one rewrites its own section.\n"
)


def machine() -> str:
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{name}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def load() -> float:
    """1-minute load average (how many runnable processes competed for the cores)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def load_note(samples: Sequence[float]) -> str:
    if not samples:
        return "load not recorded"
    return (
        f"1-min load average during the runs: median {statistics.median(samples):.1f}, "
        f"range {min(samples):.1f}–{max(samples):.1f} on {os.cpu_count()} cores"
    )


def command_line(argv: Sequence[str] | None = None) -> str:
    """`.venv/bin/python -m bench.NAME ARGS...` for this process (`python -m` sets argv[0] to the module's file)."""
    argv = list(sys.argv if argv is None else argv)
    module = ".".join(Path(argv[0]).resolve().relative_to(ROOT).with_suffix("").parts)
    return " ".join([".venv/bin/python", "-m", module] + [shlex.quote(a) for a in argv[1:]])


def launch_script(name: str) -> ModuleType:
    """launch/NAME.py, loaded by its path: launch/ holds standalone scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_device(batch: Any, device: torch.device) -> Any:
    """A copy of a `dtrain.data` Batch (a dataclass of tensors) with every tensor on `device`."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})


def train_run(
    config: str,
    overrides: Iterable[str],
    run_dir: Path,
    nproc: int = 2,
    *,
    rate: str | None = None,
    hosts: int | None = None,
    timeout: float | None = None,
    reuse: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train one run; returns {"summary", "metrics", "load", "wall_s", "log"}. With `rate` (e.g. 100mbit) it runs
    on the netns cluster, one process per host (`hosts` = nproc), each host's link capped at `rate`.
    `reuse`: a run directory with a summary.json is not run again."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    overrides = [*overrides, f"run.dir={run_dir}", "log.wandb=disabled", "log.progress=false"]
    if not (reuse and summary_path.exists()):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.parent / f"{run_dir.name}.log"
        if rate is None:
            cmd = [
                TORCHRUN,
                "--standalone",
                "--nproc-per-node",
                str(nproc),
                "-m",
                "dtrain",
                "train",
                "--config",
                config,
                "--set",
                *overrides,
            ]
        else:
            # own namespace prefix, subnet and port: the tool removes leftovers of its prefix first, so sharing the
            # default prefix with another user's cluster would tear that one down
            cmd = [
                str(NETNS_CLUSTER),
                "--hosts",
                str(hosts or nproc),
                "--nproc-per-host",
                "1",
                "--rate",
                rate,
                "--prefix",
                "b9n",
                "--subnet",
                "10.79.0",
                "--port",
                "29479",
                *(["--timeout", str(int(timeout))] if timeout else []),
                "--",
                "--config",
                config,
                "--set",
                *overrides,
            ]
        # one intra-op thread per process, as torchrun sets for several processes per node: with one process per
        # netns host torchrun leaves torch at all cores, and 2 hosts x 2 threads oversubscribe a 2-core machine
        # (thin products then run several times slower, which would penalise rank-dAD unfairly)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        load_before = load()
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                timeout=timeout + 60 if timeout else None,
            )
        wall = time.perf_counter() - t0
        if proc.returncode or not summary_path.exists():
            tail = log_path.read_text().splitlines()[-15:]
            raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        (run_dir / "bench.json").write_text(
            json.dumps({"load_before": load_before, "load_after": load(), "wall_s": wall, "command": cmd})
        )
    meta = json.loads((run_dir / "bench.json").read_text()) if (run_dir / "bench.json").exists() else {}
    return {
        "summary": json.loads(summary_path.read_text()),
        "metrics": read_metrics(run_dir),
        "load": [meta.get("load_before", float("nan")), meta.get("load_after", float("nan"))],
        "wall_s": meta.get("wall_s", float("nan")),
    }


def write_section(path: Path, text: str, intro: str = INTRO) -> None:
    """Replace the section that `text` starts with (its "## " heading line, up to the next "## " heading) or
    append it; a missing file starts with `intro`."""
    heading = text.split("\n", 1)[0]
    assert heading.startswith("## "), heading
    doc = path.read_text() if path.exists() else intro
    start = doc.find(heading + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = doc.find("\n## ", start + len(heading))
        rest = doc[end + 1 :] if end >= 0 else ""
        doc = doc[:start] + text.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    path.write_text(doc)


def write_result(
    path: Path, section: str, setup: str, loads: list[float], *body: str, command: str | None = None
) -> None:
    """A benchmark's section: heading, what ran, the machine and its load, the command, then the tables."""
    write_section(
        path,
        "\n".join(
            [
                section,
                "",
                setup,
                "",
                f"Machine: {machine()}; {load_note(loads)}.",
                "",
                command or f"Command: `{command_line()}`",
                "",
                *body,
                "",
            ]
        ),
    )


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: `python -m bench.NAME`, its docstring's first line as the description and the
    whole docstring as the epilog of --help."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )

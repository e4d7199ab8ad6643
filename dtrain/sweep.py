"""`dtrain sweep SWEEP.yaml`: train every point of a grid, one ordinary run directory per point.

A sweep file names a base config, common overrides and the grid:

    base: configs/quickstart.yaml     # relative to the sweep file, else to the current directory
    set: {train.steps: 100}           # overrides for every run (dotted keys or nested sections)
    strategies: [allreduce, powersgd] # comm.strategy
    ranks: [2, 4]                     # comm.rank; only compressed strategies are multiplied by it
    seeds: [0, 1]                     # train.seed
    world_sizes: [2]                  # processes per run
    link_rates: [10mbit]              # optional: run on the netns cluster with shaped links
    out: runs/sweeps/example          # optional, relative to the current directory; --out wins;
                                      # default runs/sweeps/<sweep file name>

Every point becomes `<out>/<strategy>[-r<rank>]-s<seed>-w<world size>[-<link rate>]`, trained by a separate
`torch.distributed.run` process whose output goes to train.log there. Points whose summary.json exists are
skipped, so an interrupted sweep is resumed by running it again. A failed run is reported and the sweep goes
on; the exit status says whether any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from tqdm import tqdm

from .config import (
    EXACT_STRATEGIES,
    STRATEGIES,
    Config,
    ConfigError,
    apply_overrides,
    check_world_size,
    config_from_dict,
    load_yaml,
)
from .metrics import SUMMARY_FILE
from .report.timemodel import parse_link_rate

# The network-namespace cluster that runs each rank behind a shaped link (needs root).
NETNS_CLUSTER = Path(__file__).resolve().parents[1] / "launch" / "netns_cluster"
# Keys the grid or the sweep itself sets for each run; a sweep's `set` may not override them.
GRID_KEYS = {
    "comm.strategy": "strategies",
    "comm.rank": "ranks",
    "train.seed": "seeds",
    "run.dir": "out",
    "log.wandb": "--wandb",
}

# A launcher runs one training command with its output going to a log file and returns its exit status.
Launcher = Callable[[list[str], Path], int]


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    set: dict[str, Any] = {}
    strategies: list[str] = Field(min_length=1)
    ranks: list[PositiveInt] | None = Field(None, min_length=1)
    seeds: list[int] | None = Field(None, min_length=1)
    world_sizes: list[PositiveInt] = Field(min_length=1)
    link_rates: list[str] | None = Field(None, min_length=1)
    out: str | None = None


@dataclass(frozen=True)
class SweepPoint:
    strategy: str
    rank: int | None  # None for exact strategies, where comm.rank has no effect
    seed: int
    world_size: int
    link_rate: str | None  # None: the local loopback link

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        link = f"-{self.link_rate}" if self.link_rate else ""
        return f"{self.strategy}{rank}-s{self.seed}-w{self.world_size}{link}"

    def overrides(self) -> list[str]:
        rank = [f"comm.rank={self.rank}"] if self.rank is not None else []
        return [f"comm.strategy={self.strategy}", *rank, f"train.seed={self.seed}"]


@dataclass(frozen=True)
class Sweep:
    base: Path
    overrides: list[str]  # the sweep file's `set`, as --set items
    points: list[SweepPoint]
    out: Path


@dataclass
class SweepOutcome:
    trained: list[str]
    skipped: list[str]
    failed: list[tuple[str, Path]]  # run name, its train.log


# ---------------------------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, out: str | None = None) -> Sweep:
    """Read and validate a sweep file; every point's config is validated too, before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = SweepFile.model_validate(load_yaml(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None
    unknown = [s for s in spec.strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"{path}: unknown strategy {unknown[0]!r}; allowed: {', '.join(STRATEGIES)}")
    for rate in spec.link_rates or []:
        parse_link_rate(rate)

    base = _find_base(path, spec.base)
    base_data = load_yaml(base)
    overrides = [f"{key}={_as_override_value(value)}" for key, value in _flatten(spec.set)]
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in GRID_KEYS:
            raise ConfigError(f"{path}: set: {key} is set for each run by the sweep ({GRID_KEYS[key]})")
    base_cfg = _validated(path, base_data, overrides)
    points = [
        SweepPoint(strategy, rank, seed, world_size, link_rate)
        for strategy in spec.strategies
        for rank in ([None] if strategy in EXACT_STRATEGIES else spec.ranks or [base_cfg.comm.rank])
        for seed in spec.seeds or [base_cfg.train.seed]
        for world_size in spec.world_sizes
        for link_rate in spec.link_rates or [None]
    ]
    for point in points:
        cfg = _validated(path, base_data, overrides + point.overrides(), point.name)
        try:  # the trainer would refuse it only after the launch
            check_world_size(cfg, point.world_size)
        except ConfigError as err:
            raise ConfigError(f"{path} (run {point.name}): {err}") from None
    out_dir = Path(out or spec.out or Path("runs") / "sweeps" / path.stem)
    return Sweep(base, overrides, points, out_dir)


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(part) for part in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unknown key {key!r} (allowed: {', '.join(SweepFile.model_fields)})"
    if e["type"] == "missing":
        return f"missing key {key!r}"
    return f"{key}: {e.get('input')!r} is invalid: {e['msg'][0].lower() + e['msg'][1:]}"


def _find_base(sweep_path: Path, base: str) -> Path:
    for candidate in (sweep_path.parent / base, Path(base)):
        if candidate.is_file():
            return Path(os.path.normpath(candidate))  # configs/sweeps/../quickstart.yaml -> configs/quickstart.yaml
    raise ConfigError(
        f"{sweep_path}: base config {base!r} not found next to the sweep file or in the current directory"
    )


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'train': {'steps': 5}, 'comm.rank': 2} -> [('train.steps', 5), ('comm.rank', 2)]."""
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _as_override_value(value: Any) -> str:
    """A value as `--set` reads it back (a YAML scalar): plain where that round-trips, else JSON (YAML too)."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _validated(path: Path, base_data: dict[str, Any], overrides: list[str], point: str = "") -> Config:
    try:
        return config_from_dict(apply_overrides(base_data, overrides))
    except ConfigError as err:
        where = f" (run {point})" if point else ""
        raise ConfigError(f"{path}{where}: {err}") from None


# ---------------------------------------------------------------------------------------------- running


def train_command(sweep: Sweep, point: SweepPoint, run_dir: Path, wandb_mode: str) -> list[str]:
    sets = [
        *sweep.overrides,
        *point.overrides(),
        f"run.dir={run_dir}",
        f"log.wandb={wandb_mode}",
        "log.progress=false",
    ]  # a progress bar in train.log is noise; the sweep shows its own
    train_args = ["--config", str(sweep.base)] + [arg for s in sets for arg in ("--set", s)]
    if point.link_rate is None:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(point.world_size),
            "-m",
            "dtrain",
            "train",
            *train_args,
        ]
    # one host (namespace) per rank, so that every rank sends through its own capped link
    return [
        str(NETNS_CLUSTER),
        "--hosts",
        str(point.world_size),
        "--nproc-per-host",
        "1",
        "--rate",
        point.link_rate,
        "--",
        *train_args,
    ]


def run_logged(argv: list[str], log: Path) -> int:
    with log.open("w") as out:
        return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode


def check_netns_cluster(sweep: Sweep) -> None:
    """Shaped links need the cluster script and root (it creates network namespaces and tc qdiscs)."""
    if not any(point.link_rate for point in sweep.points):
        return
    if not NETNS_CLUSTER.is_file():
        raise ConfigError(f"link_rates needs the netns cluster script, which is missing: {NETNS_CLUSTER}")
    if os.geteuid() != 0:
        raise ConfigError(
            "link_rates runs ranks in network namespaces, which needs root; run the sweep as root "
            "or drop link_rates and use `dtrain report --link-rates` for the time model"
        )


def run_sweep(sweep: Sweep, wandb_mode: str, launcher: Launcher = run_logged) -> SweepOutcome:
    outcome = SweepOutcome([], [], [])
    progress = tqdm(sweep.points, desc="sweep", unit="run")
    for point in progress:
        run_dir = sweep.out / point.name
        if (run_dir / SUMMARY_FILE).is_file():
            outcome.skipped.append(point.name)
            continue
        progress.set_postfix_str(point.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = train_command(sweep, point, run_dir, wandb_mode)
        # the report reads the grid point back from here (the config does not know the link rate)
        (run_dir / "sweep.json").write_text(json.dumps({**asdict(point), "command": argv}, indent=1) + "\n")
        log = run_dir / "train.log"
        status = launcher(argv, log)
        if status == 0 and (run_dir / SUMMARY_FILE).is_file():
            outcome.trained.append(point.name)
        else:
            why = f"exit status {status}" if status else f"exited 0 without writing {SUMMARY_FILE}"
            tqdm.write(f"FAILED {point.name}: {why}; log: {log}")
            outcome.failed.append((point.name, log))
    return outcome


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep: base config, overrides and grid")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and run nothing")
    parser.add_argument("--out", default=None, help="directory for the run directories (overrides the file's out)")
    parser.add_argument(
        "--wandb", choices=("offline", "disabled"), default="offline", help="wandb mode of every run (default: offline)"
    )


def run(args: argparse.Namespace, launcher: Launcher = run_logged) -> int:
    sweep = load_sweep(args.sweep_file, args.out)
    if args.dry_run:
        for point in sweep.points:
            run_dir = sweep.out / point.name
            done = f"# done ({SUMMARY_FILE} exists): " if (run_dir / SUMMARY_FILE).is_file() else ""
            print(done + shlex.join(train_command(sweep, point, run_dir, args.wandb)))
        return 0
    check_netns_cluster(sweep)
    outcome = run_sweep(sweep, args.wandb, launcher)
    print(
        f"sweep {sweep.out}: {len(outcome.trained)} trained, {len(outcome.skipped)} already done, "
        f"{len(outcome.failed)} failed"
    )
    for name, log in outcome.failed:
        print(f"  failed: {name} (log: {log})")
    if len(outcome.trained) + len(outcome.skipped):
        print(f"report: dtrain report {sweep.out}")
    return 1 if outcome.failed else 0

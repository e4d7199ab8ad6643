"""The bandwidth-vs-accuracy table: one row per configuration, aggregated over seeds.

Runs of one task are grouped by (strategy, compression rank, world size, shaped link); seeds are what varies
inside a group. Byte and time figures are means over the group's seeds; accuracy is mean ± sample standard
deviation; steps to target and time to target are means over the seeds that reached the target, with the
count of those seeds shown when it is not all of them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..config import STRATEGY_NAMES
from ..metrics import format_bytes, ring_allreduce_wire_bytes, wire_ratio
from .rundir import Run
from .timemodel import LinkRate, steps_to_target, time_to_target

# Without --target-acc, a task's target is this fraction of the best configuration's mean final accuracy.
DEFAULT_TARGET_FRACTION = 0.9


@dataclass(frozen=True)
class Row:
    strategy: str
    rank: int | None  # None for exact strategies
    world_size: int
    link_rate: str | None  # the shaped link the runs were measured on; None for the local link
    runs: tuple[Run, ...]
    payload_bytes_per_step: float
    wire_bytes_per_step: float
    compression_ratio: float  # fp32 all-reduce payload / this strategy's payload (the payload ratio)
    wire_ratio: float | None  # fp32 ring all-reduce wire bytes at this world size / this strategy's; None at S=1
    acc_mean: float
    acc_std: float | None  # None with a single seed
    steps_to_target: float | None
    reached: int  # seeds that reached the target
    comm_s_per_step: float
    step_s: float
    compute_s_per_step: float
    measured_time_to_target_s: float | None  # steps to target x measured step time
    time_to_target_s: dict[str, float | None]  # link-rate label -> modelled seconds

    @property
    def label(self) -> str:
        parts = [self.strategy] + ([f"r{self.rank}"] if self.rank is not None else []) + [f"S={self.world_size}"]
        return " ".join(parts + ([f"@{self.link_rate}"] if self.link_rate else []))


@dataclass(frozen=True)
class TaskTable:
    task: str
    target_acc: float
    target_rule: str  # how the target was chosen, stated in the report
    rows: list[Row]


def build_tables(runs: list[Run], target_acc: float | None, rates: list[LinkRate]) -> list[TaskTable]:
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    return [_task_table(task, by_task[task], target_acc, rates) for task in sorted(by_task)]


def _task_table(task: str, runs: list[Run], target_acc: float | None, rates: list[LinkRate]) -> TaskTable:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.strategy, run.rank, run.world_size, run.link_rate)].append(run)
    if target_acc is None:
        best = max(statistics.fmean(_final_acc(r) for r in group) for group in groups.values())
        target_acc = DEFAULT_TARGET_FRACTION * best
        rule = f"{DEFAULT_TARGET_FRACTION:.0%} of the best mean final accuracy in this task, {best:.4f}"
    else:
        rule = "given with --target-acc"
    rows = [_row(group, target_acc, rates) for _, group in sorted(groups.items(), key=lambda kv: _order(kv[0]))]
    return TaskTable(task, target_acc, rule, rows)


def _order(key: tuple) -> tuple:
    strategy, rank, world_size, link_rate = key
    position = STRATEGY_NAMES.index(strategy) if strategy in STRATEGY_NAMES else len(STRATEGY_NAMES)
    return (position, strategy, rank or 0, world_size, link_rate or "")


def _final_acc(run: Run) -> float:
    return float(run.summary[metrics.FINAL_VAL_ACC])


def _mean(runs: list[Run], key: str) -> float:
    return statistics.fmean(float(run.summary[key]) for run in runs)


def _mean_over_reached(runs: Iterable[Run], target_acc: float, seconds: Callable[[Run, int], float]) -> float | None:
    """Mean of seconds(run, steps to target) over the runs that reach the target; None if none does."""
    times = []
    for run in runs:
        steps = steps_to_target(run.eval_rows, target_acc)
        if steps is not None:
            times.append(seconds(run, steps))
    return statistics.fmean(times) if times else None


def mean_time_to_target(runs: Iterable[Run], target_acc: float, rate: LinkRate) -> float | None:
    """The time model at `rate`, averaged over the runs that reach the target."""

    def modelled(run: Run, steps: int) -> float:
        return time_to_target(
            steps,
            float(run.summary[metrics.TIME_COMPUTE_S_PER_STEP]),
            float(run.summary[metrics.COMM_WIRE_BYTES_PER_STEP]),
            rate,
        )

    return _mean_over_reached(runs, target_acc, modelled)


def _measured_time_to_target(runs: Iterable[Run], target_acc: float) -> float | None:
    """Steps to target x measured step time: the time on the link the runs actually had."""
    return _mean_over_reached(runs, target_acc, lambda run, steps: steps * float(run.summary[metrics.TIME_STEP_S_MEAN]))


def _row(runs: list[Run], target_acc: float, rates: list[LinkRate]) -> Row:
    runs = sorted(runs, key=lambda run: run.seed)
    first = runs[0]
    accs = [_final_acc(run) for run in runs]
    reached = [steps for steps in (steps_to_target(run.eval_rows, target_acc) for run in runs) if steps is not None]
    payload = _mean(runs, metrics.COMM_BYTES_PER_STEP)
    wire = _mean(runs, metrics.COMM_WIRE_BYTES_PER_STEP)
    allreduce = _mean(runs, metrics.COMM_ALLREDUCE_BYTES_PER_STEP)
    return Row(
        strategy=first.strategy,
        rank=first.rank,
        world_size=first.world_size,
        link_rate=first.link_rate,
        runs=tuple(runs),
        payload_bytes_per_step=payload,
        wire_bytes_per_step=wire,
        compression_ratio=allreduce / payload if payload else float("inf"),
        # from the summaries' byte figures, so runs written before comm/wire_ratio existed get one too
        wire_ratio=wire_ratio(ring_allreduce_wire_bytes(allreduce, first.world_size), wire),
        acc_mean=statistics.fmean(accs),
        acc_std=statistics.stdev(accs) if len(accs) > 1 else None,
        steps_to_target=statistics.fmean(reached) if reached else None,
        reached=len(reached),
        comm_s_per_step=_mean(runs, metrics.COMM_TIME_PER_STEP_S),
        step_s=_mean(runs, metrics.TIME_STEP_S_MEAN),
        compute_s_per_step=_mean(runs, metrics.TIME_COMPUTE_S_PER_STEP),
        measured_time_to_target_s=_measured_time_to_target(runs, target_acc),
        time_to_target_s={rate.label: mean_time_to_target(runs, target_acc, rate) for rate in rates},
    )


# ---------------------------------------------------------------------------------------------- rendering


def fmt_seconds(s: float) -> str:
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    if s < 120.0:
        return f"{s:.3g} s"
    if s < 7200.0:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def fmt_ratio(ratio: float | None) -> str:
    """'4.48×'; '—' where there is no ratio (world size 1: no wire bytes on either side)."""
    return "—" if ratio is None else f"{ratio:.2f}×"


def headline(table: TaskTable) -> str | None:
    """The task's headline: the configuration with the largest wire ratio against fp32 ring all-reduce (at its
    own world size), with its payload ratio and accuracy beside the exact baseline's at the same world size.
    None when no configuration ran on more than one rank."""
    rows = [row for row in table.rows if row.wire_ratio is not None]
    if not rows:
        return None
    best = max(rows, key=lambda row: row.wire_ratio or 0.0)
    text = (
        f"**{best.label}: {metrics.describe_wire_ratio(best.wire_ratio, best.world_size)}** "
        f"(payload {best.compression_ratio:.2f}× fewer than fp32 all-reduce), final val acc {fmt_accuracy(best)}"
    )
    same_setting = [r for r in table.rows if (r.world_size, r.link_rate) == (best.world_size, best.link_rate)]
    exact = [r for r in same_setting if r.strategy in ("allreduce", "ddp")]
    if exact and best not in exact:
        text += f" against {fmt_accuracy(exact[0])} for {exact[0].strategy}"
    return text + "."


def fmt_accuracy(row: Row) -> str:
    if row.acc_std is None:
        return f"{row.acc_mean:.4f}"
    return f"{row.acc_mean:.4f} ± {row.acc_std:.4f}"


def _fmt_reached(value: str, row: Row) -> str:
    """A figure averaged over the seeds that reached the target says so when some did not."""
    n = len(row.runs)
    return value if row.reached == n else f"{value} ({row.reached}/{n} seeds)"


def to_markdown(table: TaskTable, rates: list[LinkRate]) -> str:
    measured_links = any(row.link_rate for row in table.rows)
    header = (
        ["strategy", "rank", "world size"]
        + (["link"] if measured_links else [])
        + [
            "seeds",
            "payload / step",
            "wire / step",
            "payload ratio vs fp32 all-reduce",
            "wire ratio vs fp32 ring all-reduce",
            "final val acc",
            f"steps to {table.target_acc:.4f}",
            "comm / step",
            "step time",
            "time to target, as run",
        ]
        + [f"time to target @ {rate.label}" for rate in rates]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        not_reached = "not reached"
        cells = [row.strategy, "—" if row.rank is None else str(row.rank), str(row.world_size)]
        cells += [row.link_rate or "local"] if measured_links else []
        cells += [
            str(len(row.runs)),
            format_bytes(row.payload_bytes_per_step),
            format_bytes(row.wire_bytes_per_step),
            f"{row.compression_ratio:.2f}×",
            fmt_ratio(row.wire_ratio),
            fmt_accuracy(row),
            not_reached if row.steps_to_target is None else _fmt_reached(f"{row.steps_to_target:.0f}", row),
            fmt_seconds(row.comm_s_per_step),
            fmt_seconds(row.step_s),
        ]
        times = [row.measured_time_to_target_s] + [row.time_to_target_s[rate.label] for rate in rates]
        cells += [not_reached if t is None else _fmt_reached(fmt_seconds(t), row) for t in times]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records(tables: list[TaskTable], rates: list[LinkRate]) -> tuple[list[str], list[list[Any]]]:
    """The tables as plain numbers (one list per row), for wandb.Table; missing figures are None."""
    columns = [
        "task",
        "strategy",
        "rank",
        "world_size",
        "link_rate",
        "seeds",
        "payload_bytes_per_step",
        "wire_bytes_per_step",
        "compression_ratio",
        "wire_ratio",
        "final_acc_mean",
        "final_acc_std",
        "target_acc",
        "steps_to_target",
        "seeds_reached",
        "comm_s_per_step",
        "step_s",
        "compute_s_per_step",
        "time_to_target_s_as_run",
    ]
    columns += [f"time_to_target_s@{rate.label}" for rate in rates]
    data = [
        [
            table.task,
            row.strategy,
            row.rank,
            row.world_size,
            row.link_rate or "local",
            len(row.runs),
            row.payload_bytes_per_step,
            row.wire_bytes_per_step,
            row.compression_ratio,
            row.wire_ratio,
            row.acc_mean,
            row.acc_std,
            table.target_acc,
            row.steps_to_target,
            row.reached,
            row.comm_s_per_step,
            row.step_s,
            row.compute_s_per_step,
            row.measured_time_to_target_s,
        ]
        + [row.time_to_target_s[rate.label] for rate in rates]
        for table in tables
        for row in table.rows
    ]
    return columns, data

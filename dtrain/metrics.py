"""Metric names, what a model reports about itself, and the two ways of reading metrics back: the run
directory's metrics.jsonl, and byte figures formatted for people.

Every metric name and summary key the trainer writes is a constant here; the trainer, the report, the tracker
and the tests import them, so a name is spelled once. docs/outputs.md lists them: a public interface (add, do
not rename). Per-layer names are templates, filled with `.format(layer=...)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------- files
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# ---------------------------------------------------------------------------------------------- every row
STEP = "step"

# ---------------------------------------------------------------------------------------------- training rows
TRAIN_PREFIX = "train/"
TRAIN_LOSS = "train/loss"
COMM_BYTES_SENT = "comm/bytes_sent"
COMM_BYTES_CUM = "comm/bytes_cum"  # also in eval rows: the communication axis of the accuracy curves
COMM_BYTES_RECV = "comm/bytes_recv"
COMM_WIRE_BYTES = "comm/wire_bytes"
COMM_TIME_S = "comm/time_s"
COMM_CONTROL_BYTES = "comm/control_bytes"  # payload of this step's control collectives (not gradient sync)
TIME_STEP_S = "time/step_s"
TIME_DATA_WAIT_S = "time/data_wait_s"  # the part of time/step_s spent waiting for this step's batch
LR = "lr"
GRAD_NORM = "grad_norm"
SKIPPED = "skipped"

# FPSA's own statistics of its last forward (SelfTransformer.step_statistics)
FPSA_PREFIX = "fpsa/"
FPSA_ITERS_MEAN = "fpsa/iters_mean"
FPSA_CONVERGED_FRAC = "fpsa/converged_frac"
FPSA_ITERS_LAYER = "fpsa/iters_l{layer}"
FPSA_LOOP_LAYER = "fpsa/loop_l{layer}"
FPSA_ADJ_ITERS_LAYER = "fpsa/adj_iters_l{layer}"
FPSA_ADJ_RESIDUAL_LAYER = "fpsa/adj_residual_l{layer}"
FPSA_ADJ_FALLBACK_LAYER = "fpsa/adj_fallback_l{layer}"
FPSA_JAC_PENALTY = "fpsa/jac_penalty"

# rank-dAD's spectrum of the captured gradients (CommStats.extra); `layer` is the layer's name
RANKDAD_PREFIX = "rankdad/"
RANKDAD_SIGMA = "rankdad/{layer}/sigma{j}"
RANKDAD_EFF_RANK = "rankdad/{layer}/eff_rank"
#: rankdad with a rank budget: the rank each layer used this step
RANKDAD_K = "rankdad/{layer}/k"

# ---------------------------------------------------------------------------------------------- eval rows
VAL_PREFIX = "val/"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
#: exp(val/loss): masked-LM tasks only (the mean cross-entropy of the masked tokens)
VAL_PERPLEXITY = "val/perplexity"
# mean over difficulties of the iterations per example; the name predates the protocol below and is public
VAL_EXAMPLE_ITERS_MEAN = "val/fpsa_iters_mean"
#: least-squares slope of the iterations per token (mean over layers) on the token's difficulty
#: (Task.token_difficulty), over the real tokens of the held-out split; a model that reports token iterations
#: on a task with a per-token difficulty only
VAL_TOKEN_ITERS_SLOPE = "val/fpsa_token_iters_slope"
#: {token difficulty: mean iterations per token} (eval rows and summary.json; keys are strings in the files)
TOKEN_ITERS_BY_DIFFICULTY = "fpsa/iters_by_token_difficulty"

# ---------------------------------------------------------------------------------------------- summary.json
PARAMS = "params"
WORLD_SIZE = "world_size"
STRATEGY = "strategy"
STEPS = "steps"
TASK = "task"
ATTENTION = "attention"
COMM_RANK = "comm_rank"
SEED = "seed"
ENGINE = "engine"
FINAL_VAL_ACC = "final/val_acc"
FINAL_VAL_LOSS = "final/val_loss"
FINAL_VAL_PERPLEXITY = "final/val_perplexity"
FINAL_TOKEN_ITERS_SLOPE = "final/fpsa_token_iters_slope"  # val/fpsa_token_iters_slope of the final evaluation
COMM_BYTES_TOTAL = "comm/bytes_total"
COMM_BYTES_PER_STEP = "comm/bytes_per_step"
COMM_WIRE_BYTES_PER_STEP = "comm/wire_bytes_per_step"
COMM_ALLREDUCE_BYTES_PER_STEP = "comm/allreduce_bytes_per_step"
COMPRESSION_RATIO = "compression_ratio"  # = COMM_PAYLOAD_RATIO, kept for compatibility
COMM_PAYLOAD_RATIO = "comm/payload_ratio"
COMM_WIRE_RATIO = "comm/wire_ratio"
COMM_ALLREDUCE_WIRE_BYTES_PER_STEP = "comm/allreduce_wire_bytes_per_step"
COMM_CONTROL_BYTES_PER_STEP = "comm/control_bytes_per_step"
TIME_DATA_WAIT_S_MEAN = "time/data_wait_s_mean"
GRAD_ACCUM = "grad_accum"
PRECISION = "precision"  # train.precision
COMM_TIME_PER_STEP_S = "comm/time_per_step_s"
TIME_STEP_S_MEAN = "time/step_s_mean"
TIME_COMPUTE_S_PER_STEP = "time/compute_s_per_step"
SKIPPED_STEPS = "skipped_steps"
WALL_S = "wall_s"
# iterations per example by task difficulty (a public name from when only FPSA reported them)
EXAMPLE_ITERS_BY_DIFFICULTY = "fpsa/iters_by_difficulty"
VAL_ACC_BY_DIFFICULTY = "val/acc_by_difficulty"

# ---------------------------------------------------------------------------------------------- wandb only
BYTES_VS_ACCURACY = "bytes_vs_accuracy"  # the tracker's table of (step, comm/bytes_cum, val/acc)
#: the tracker's table of the final fpsa/iters_by_token_difficulty: (token_difficulty, iterations)
TOKEN_ITERS_TABLE = "fpsa_token_iters_by_difficulty"


@runtime_checkable
class ReportsStatistics(Protocol):
    """A model that reports its own statistics, so the trainer logs them without knowing what they mean.

    step_statistics: metric name -> value for the last training forward (logged in that step's row; {} when
        there is nothing to say).
    example_iterations: float [B] on any device, the adaptive computation each example of the last forward
        needed (iterations, mean over layers), or None when the model does not adapt its computation.
    """

    def step_statistics(self) -> dict[str, float]: ...

    def example_iterations(self) -> torch.Tensor | None: ...


@runtime_checkable
class ReportsTokenIterations(Protocol):
    """A model whose adaptive computation is per token.

    token_iterations: float [B, L] on any device, the iterations each token of the last forward needed (mean
        over layers, 0 for padding), or None when the model does not adapt its computation.
    """

    def token_iterations(self) -> torch.Tensor | None: ...


def step_statistics(model: object) -> dict[str, float]:
    """The model's own statistics of its last training forward ({} for a model that reports none)."""
    return model.step_statistics() if isinstance(model, ReportsStatistics) else {}


def example_iterations(model: object) -> torch.Tensor | None:
    """Per-example iterations of the model's last forward, None for a model without adaptive computation."""
    return model.example_iterations() if isinstance(model, ReportsStatistics) else None


def token_iterations(model: object) -> torch.Tensor | None:
    """Per-token iterations of the model's last forward, None for a model without per-token adaptive computation."""
    return model.token_iterations() if isinstance(model, ReportsTokenIterations) else None


def least_squares_slope(x: Sequence[float], counts: Sequence[float], sums: Sequence[float]) -> float:
    """Least-squares slope of y on x over points grouped by x: counts[i] points at x = x[i] whose y add up to
    sums[i]. The same slope as a fit to the points one by one (sum over points of (x - x̄)(y - ȳ) is
    sum over groups of (x_i - x̄) sums_i); NaN when the points take fewer than two distinct x."""
    n = math.fsum(counts)
    if n == 0:
        return math.nan
    x_mean = math.fsum(c * xi for xi, c in zip(x, counts)) / n
    sxx = math.fsum(c * (xi - x_mean) ** 2 for xi, c in zip(x, counts))
    if sxx == 0:
        return math.nan
    return math.fsum((xi - x_mean) * si for xi, si in zip(x, sums)) / sxx


def format_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), like the link rates bytes are divided by: '118 kB', '1.34 MB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def ring_allreduce_wire_bytes(payload: float, world_size: int) -> float:
    """Bytes a ring all-reduce of `payload` bytes puts on each rank's link: 2(S-1)/S x payload (0 at S = 1)."""
    return 2.0 * (world_size - 1) / world_size * payload


def wire_ratio(reference_wire: float, wire: float) -> float | None:
    """reference ÷ this run's wire bytes per step: inf when the run put nothing on the wire but the reference
    would have, None when neither puts anything on a wire (world size 1: no link, no ratio)."""
    if wire > 0:
        return reference_wire / wire
    return float("inf") if reference_wire > 0 else None


def describe_wire_ratio(ratio: float | None, world_size: int) -> str:
    """'12.3x fewer wire bytes than fp32 ring all-reduce at world size 4' (or 'as many ... as', '2.0x MORE');
    `ratio` as `wire_ratio` returns it."""
    reference = f"fp32 ring all-reduce at world size {world_size}"
    if ratio is None:
        return f"no wire bytes, as {reference} (one rank: nothing crosses a link)"
    if math.isinf(ratio):
        return f"no wire bytes, against {reference}"
    if ratio == 0:
        return f"wire bytes where {reference} has none"
    if round(ratio, 1) == 1.0:
        return f"as many wire bytes as {reference}"
    if ratio > 1:
        return f"{ratio:.1f}x fewer wire bytes than {reference}"
    return f"{1 / ratio:.1f}x MORE wire bytes than {reference}"


class MetricsLineError(ValueError):
    """A complete line of metrics.jsonl (not the last one) is not JSON; the message names the line."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of a run directory's metrics.jsonl, in order ([] when there is none yet). A last line cut short
    by a crash is skipped: every complete line before it is returned. Values are as written: NaN and ±Inf are
    the strings 'nan', 'inf', '-inf'."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise MetricsLineError(f"{METRICS_FILE} line {number} is not valid JSON") from None
    return rows

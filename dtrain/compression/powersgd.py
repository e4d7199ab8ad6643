"""`powersgd`: rank-r PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019) outside DDP.

Per step, after `start_step` steps of plain all-reduce (torch's `start_powerSGD_iter`):
- vectors, scalars and matrices not worth compressing: exact mean, bucketed fp32 all-reduce;
- every other gradient, viewed as M = (shape[0], numel / shape[0]) like torch's hook, plus its error-feedback
  residual: one step of subspace iteration from last step's Q (warm start), P and Q all-reduced in
  `comm.factor_dtype` (int8/fp8 through `Comm.all_reduce_quantized_async`); the delivered gradient is P Qᵀ, the
  same on every rank.

Pieces, GRACE-style: `matrix_plan` decides what is compressed, `power_iteration_mean` is the compressor (it
talks to other ranks only through the sum function it is given, so it runs without a process group),
`ErrorFeedback` / `TensorMemory` hold the residuals and warm-start factors, `Comm` does the collectives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from .base import CommStats, Strategy
from .buckets import BucketedMean, grad_or_zeros, trainable_parameters
from .comm import Comm
from .dtypes import QUANTIZED, quantized_sum_bytes, wire_dtype
from .lowrank import orthonormalize, thin_product
from .memory import ErrorFeedback, TensorMemory


@dataclass(frozen=True)
class MatrixPlan:
    """A gradient sent as rank-`rank` factors P (rows x rank) and Q (cols x rank)."""

    name: str
    rows: int
    cols: int
    rank: int

    @property
    def factor_numel(self) -> int:
        return (self.rows + self.cols) * self.rank


def matrix_plan(name: str, shape: Sequence[int], rank: int, min_compression_rate: float) -> MatrixPlan | None:
    """torch's rule (`powerSGD_hook._should_compress`), so that both PowerSGDs compress the same tensors: view as
    (n, m) = (shape[0], numel / shape[0]), use r = min(n, m, rank), compress only if (n + m) r x rate < n m.
    None: send raw. Vectors and scalars are always raw (for them the rule can never hold)."""
    if len(shape) < 2:
        return None
    n = shape[0]
    m = math.prod(shape) // n
    r = min(n, m, rank)
    return MatrixPlan(name, n, m, r) if (n + m) * r * min_compression_rate < n * m else None


class SumAcrossRanks(Protocol):
    """In-place sum over ranks; `parts` charges the bytes per layer. `Comm.all_reduce_` is one."""

    def __call__(self, tensor: torch.Tensor, name: str, *, parts: Mapping[str, int]) -> torch.Tensor: ...


def power_iteration_mean(
    matrices: Sequence[torch.Tensor],
    qs: Sequence[torch.Tensor],
    plans: Sequence[MatrixPlan],
    all_reduce: SumAcrossRanks,
    world_size: int,
    factor_dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Low-rank approximation of the mean over ranks of each matrix, one subspace iteration per step:

        Q <- orth(Q);  P = sum_ranks M Q;  P <- orth(P);  Q = mean_ranks Mᵀ P;  approximation = P Qᵀ = P Pᵀ mean(M)

    The compressor is linear in M, so P and Q are all-reduced (not gathered): two collectives for all matrices,
    sent as `factor_dtype`. Returns (approximations, Q), Q being the next step's warm start. P and Q are
    identical on every rank after their all-reduce, so the approximations are too.
    """
    qs = [orthonormalize(q) for q in qs]
    ps = _sum_packed([thin_product(m, q) for m, q in zip(matrices, qs)], plans, all_reduce, "powersgd/P", factor_dtype)
    ps = [orthonormalize(p) for p in ps]
    qs = _sum_packed(
        [thin_product(m.T, p) for m, p in zip(matrices, ps)], plans, all_reduce, "powersgd/Q", factor_dtype
    )
    qs = [q / world_size for q in qs]
    return [p @ q.T for p, q in zip(ps, qs)], qs


def _sum_packed(
    tensors: list[torch.Tensor], plans: Sequence[MatrixPlan], all_reduce: SumAcrossRanks, name: str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Sum over ranks of several n × r tensors in one collective, sent as `dtype`, returned in their own dtype.
    Packed column after column: an 8-bit sum scales each block of consecutive values by its largest, and a
    factor's columns differ in size by their singular values."""
    flat = torch.cat([t.T.reshape(-1).to(dtype) for t in tensors])
    all_reduce(flat, name, parts={plan.name: t.numel() * flat.element_size() for plan, t in zip(plans, tensors)})
    chunks = flat.split([t.numel() for t in tensors])
    return [chunk.view(t.shape[1], t.shape[0]).T.to(t.dtype) for chunk, t in zip(chunks, tensors)]


def quantized_sum(comm: Comm, fmt: str) -> SumAcrossRanks:
    """A `SumAcrossRanks` that sends an fp32 tensor in the 8-bit format `fmt` (`Comm.all_reduce_quantized_async`)
    and writes the sum, the same on every rank, back into it."""

    def sum_(tensor: torch.Tensor, name: str, *, parts: Mapping[str, int]) -> torch.Tensor:
        values_of = {n: nbytes // tensor.element_size() for n, nbytes in parts.items()}
        return tensor.copy_(comm.all_reduce_quantized_async(tensor, name, fmt, values_of).wait())

    return sum_


def initial_factor(
    plans: Sequence[MatrixPlan], step: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Random Q for a cold start, drawn from a generator seeded by the step. The same on every rank, because
    sum_ranks M Q = (sum_ranks M) Q only for a shared Q: with per-rank Qs, P would not span the mean's columns.
    The same after a restart (no RNG state to checkpoint); different from step to step. Drawn on the CPU, so
    the numbers do not depend on the device."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(plan.cols, plan.rank, generator=g, dtype=dtype).to(device) for plan in plans]


class PowerSGD(Strategy):
    name = "powersgd"

    def __init__(self, options: Any, group: dist.ProcessGroup | None = None) -> None:
        self.cfg = options
        self.comm = Comm(group)
        # 8-bit factors: fp32 into the quantized all-reduce, which encodes them; others are cast for the wire
        self.quantized = options.factor_dtype in QUANTIZED
        self.factor_dtype = torch.float32 if self.quantized else wire_dtype(options.factor_dtype)
        self.sum_factors = quantized_sum(self.comm, options.factor_dtype) if self.quantized else self.comm.all_reduce_
        self.step = 0
        self.residuals = ErrorFeedback()
        self.factors = TensorMemory()
        self.compressed: list[tuple[MatrixPlan, nn.Parameter]] = []
        self.plain: BucketedMean | None = None
        self.raw: BucketedMean | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        params = trainable_parameters(model)
        plans = {n: matrix_plan(n, p.shape, self.cfg.rank, self.cfg.min_compression_rate) for n, p in params}
        self.compressed = [(plan, p) for n, p in params if (plan := plans[n]) is not None]
        self.plain = BucketedMean(params, self.cfg.bucket_mb, prefix="powersgd/plain")
        self.raw = BucketedMean(
            [(n, p) for n, p in params if plans[n] is None], self.cfg.bucket_mb, prefix="powersgd/raw"
        )
        return model

    def synchronize(self) -> CommStats:
        if self.plain is None or self.raw is None:
            raise RuntimeError("powersgd: synchronize() before attach()")
        if self.step < self.cfg.start_step:
            self.plain(self.comm)
        else:
            self.raw(self.comm)
            if self.compressed:
                self._low_rank_mean()
        self.step += 1
        return self.comm.reset()

    def _low_rank_mean(self) -> None:
        plans = [plan for plan, _ in self.compressed]
        grads = [grad_or_zeros(p) for _, p in self.compressed]
        ef, warm = self.cfg.error_feedback, self.cfg.warm_start
        compensated = [self.residuals.compensate(plan.name, g) if ef else g for plan, g in zip(plans, grads)]
        # arithmetic in fp32 at least: QR has no half-precision kernels, and bf16/fp16 is for the wire only
        compute = torch.promote_types(grads[0].dtype, torch.float32)
        matrices = [c.reshape(plan.rows, plan.cols).to(compute) for plan, c in zip(plans, compensated)]
        qs = [self.factors.get(plan.name) if warm else None for plan in plans]
        cold = [plan for plan, q in zip(plans, qs) if q is None]
        fresh = iter(initial_factor(cold, self.step, matrices[0].dtype, matrices[0].device))
        qs = [next(fresh) if q is None else q for q in qs]
        approximations, qs = power_iteration_mean(
            matrices, qs, plans, self.sum_factors, self.comm.world_size, self.factor_dtype
        )
        # P and Q are all-reduced, so the approximations are the same on every rank and so is this decision: a
        # non-finite step (the trainer's nan_policy skips it) leaves residuals and warm starts as they were,
        # instead of poisoning every later step through them. One fused check, one host sync.
        remember = bool(torch.isfinite(torch.stack([a.sum() for a in approximations])).all())
        for plan, g, c, a, q in zip(plans, grads, compensated, approximations, qs):
            delivered = a.view_as(g)
            if remember and ef:
                self.residuals.update(plan.name, c, delivered)
            if remember and warm:
                self.factors.put(plan.name, q)
            g.copy_(delivered)

    def rescale_memory(self, ratio: float) -> None:
        self.residuals.rescale_(ratio)  # Q is orthonormalised before use: its scale does not matter

    # ------------------------------------------------------------------ closed forms, checkpoints
    def bytes_per_step(self, step: int) -> int:
        """Payload one rank sends at `step` (0-based), closed form."""
        if self.plain is None or self.raw is None:
            raise RuntimeError("powersgd: bytes_per_step() before attach()")
        if step < self.cfg.start_step:
            return self.plain.nbytes
        if self.quantized:  # P and Q: two quantized sums, each padded to whole blocks
            S, fmt = self.comm.world_size, self.cfg.factor_dtype
            p_numel = sum(plan.rows * plan.rank for plan, _ in self.compressed)
            q_numel = sum(plan.cols * plan.rank for plan, _ in self.compressed)
            return self.raw.nbytes + quantized_sum_bytes(fmt, p_numel, S) + quantized_sum_bytes(fmt, q_numel, S)
        factor_numel = sum(plan.factor_numel for plan, _ in self.compressed)
        return self.raw.nbytes + factor_numel * self.factor_dtype.itemsize

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "strategy": self.name,
            "rank": self.cfg.rank,
            "start_step": self.cfg.start_step,
            "factor_dtype": self.cfg.factor_dtype,
        }
        if self.raw is not None:
            info.update(
                compressed={p.name: [p.rows, p.cols, p.rank] for p, _ in self.compressed},
                raw=[n for bucket in self.raw.layout() for n in bucket],
                bytes_per_step_plain=self.bytes_per_step(0),
                bytes_per_step_compressed=self.bytes_per_step(self.cfg.start_step),
            )
        return info

    def state_dict(self) -> dict[str, Any]:
        """`residuals` are this rank's own; `factors` (Q) and `step` are the same on every rank."""
        return {"step": self.step, "residuals": self.residuals.state_dict(), "factors": self.factors.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"step", "residuals", "factors"}:
            raise ValueError(f"powersgd: strategy state has keys {sorted(state)}; expected factors, residuals, step")
        self.step = int(state["step"])
        self.residuals.load_state_dict(state["residuals"])
        self.factors.load_state_dict(state["factors"])

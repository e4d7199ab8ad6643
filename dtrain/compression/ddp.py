"""`ddp` and `ddp-powersgd`: torch's DistributedDataParallel with a comm hook that counts what it sends.

DDP reduces gradient buckets during backward (overlapping communication with the rest of backward), so these
strategies synchronise inside `loss.backward()`; `synchronize()` only collects what the hooks counted.

One strategy class, `DDPStrategy`, composed with a hook (no subclassing):
- `ddp`: `AllReduceHook`, torch's default hook (`allreduce_hook`: divide by world size, all-reduce the bucket).
- `ddp-powersgd`: `PowerSGDHook`, torch's `powerSGD_hook` with `PowerSGDState` built from the options.

Counting: a hook knows its bucket's tensors, so bytes are charged per parameter name. Time is each bucket's
hook call to the completion of its future; buckets in flight together each count their own interval.
"""

# No `from __future__ import annotations`: DDP checks a hook's annotations against the real classes
# (dist.GradBucket, Future[Tensor]) and rejects them as strings.
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from .base import CommStats, Strategy
from .comm import Comm
from .powersgd import matrix_plan


@dataclass
class _BucketReduction:
    """One hook call: its payload per parameter name, and when it started and finished."""

    name: str
    parts: dict[str, int]
    start: float
    end: float | None = None


#: bytes per parameter name of a bucket's gradients as they go on the wire
PartsOf = Callable[[dist.GradBucket], dict[str, int]]


class Hook(Protocol):
    """A DDP comm hook that also says what it sends (bytes per parameter name), and remembers state."""

    def __call__(
        self, group: dist.ProcessGroup | None, bucket: dist.GradBucket, dense_parts: PartsOf
    ) -> tuple[dict[str, int], torch.futures.Future[torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def rescale_memory(self, ratio: float) -> None: ...


class AllReduceHook:
    """torch's default hook: the bucket, divided by the world size, all-reduced."""

    def __call__(
        self, group: dist.ProcessGroup | None, bucket: dist.GradBucket, dense_parts: PartsOf
    ) -> tuple[dict[str, int], torch.futures.Future[torch.Tensor]]:
        return dense_parts(bucket), allreduce_hook(group, bucket)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"ddp: unexpected strategy state keys {sorted(state)}")

    def describe(self) -> dict[str, Any]:
        return {}

    def rescale_memory(self, ratio: float) -> None:
        pass  # no memory


class PowerSGDHook:
    """torch's PowerSGD hook. Per bucket, before `start_step`: the whole bucket is all-reduced. After: the
    uncompressed tensors, then all P, then all Q (three all-reduces), in fp32."""

    def __init__(self, options: Any, group: dist.ProcessGroup | None) -> None:
        self.options = options
        self.state = PowerSGDState(
            process_group=group,
            matrix_approximation_rank=options.rank,
            start_powerSGD_iter=options.start_step,
            min_compression_rate=options.min_compression_rate,
            use_error_feedback=options.error_feedback,
            warm_start=options.warm_start,
            random_seed=0,
        )
        # After a restore, the first step must not compress: the hook keys its residuals and P/Q by bucket index,
        # and a new DDP's first-step buckets differ from the rebuilt ones they were saved under.
        self._dense_until_rebuild = False

    def __call__(
        self, group: dist.ProcessGroup | None, bucket: dist.GradBucket, dense_parts: PartsOf
    ) -> tuple[dict[str, int], torch.futures.Future[torch.Tensor]]:
        if self._dense_until_rebuild:
            fut = allreduce_hook(group, bucket)
            if bucket.is_last():
                self.state.iter += 1
                self._dense_until_rebuild = False
            return dense_parts(bucket), fut
        compressing = self.state.iter >= self.state.start_powerSGD_iter
        if not compressing:
            return dense_parts(bucket), powerSGD_hook(self.state, bucket)
        memory = self._snapshot(bucket.index())
        fut = powerSGD_hook(self.state, bucket)
        return self._compressed_parts(bucket, dense_parts), fut.then(lambda done: self._keep_finite(done, memory))

    _MEMORIES = ("error_dict", "p_memory_dict", "q_memory_dict")

    def _snapshot(self, index: int) -> dict[str, torch.Tensor | None]:
        """Copies of this bucket's residual and warm-start P, Q before the hook updates them (partly in place)."""
        return {
            m: (t.clone() if (t := getattr(self.state, m).get(index)) is not None else None) for m in self._MEMORIES
        } | {"index": index}  # type: ignore[dict-item]

    def _keep_finite(self, done: torch.futures.Future[torch.Tensor], memory: dict[str, Any]) -> torch.Tensor:
        """A bucket whose delivered mean is not finite (a NaN step; the trainer's nan_policy skips it) puts the
        hook's memory back as it was: otherwise the residual and the warm start carry the NaN into every later
        step. The delivered bucket is identical on every rank (P, Q and the rest are all-reduced), so every rank
        decides alike."""
        result = done.value()
        if not bool(torch.isfinite(result).all()):
            index = memory["index"]
            for name in self._MEMORIES:
                store = getattr(self.state, name)
                if memory[name] is None:
                    store.pop(index, None)
                else:
                    store[index] = memory[name]
        return result

    def _compressed_parts(self, bucket: dist.GradBucket, dense_parts: PartsOf) -> dict[str, int]:
        """Elements the hook all-reduces per tensor once compressing: (n + m) r for a compressed matrix (its
        share of the P and Q buffers), numel for the rest; `matrix_plan` is the hook's own rule."""
        parts = {}
        for (name, nbytes), g in zip(dense_parts(bucket).items(), bucket.gradients()):
            plan = matrix_plan(name, g.shape, self.state.matrix_approximation_rank, self.state.min_compression_rate)
            parts[name] = plan.factor_numel * g.element_size() if plan else nbytes
        return parts

    def rescale_memory(self, ratio: float) -> None:
        for residual in self.state.error_dict.values():
            residual.mul_(ratio)

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {"rank": o.rank, "start_step": o.start_step, "min_compression_rate": o.min_compression_rate}

    def state_dict(self) -> dict[str, Any]:
        """The hook's memory (keyed by DDP bucket index; residuals are this rank's own) and its numpy RNG, as
        tensors and plain numbers so any checkpoint format can hold it."""
        s = self.state
        _, keys, pos, has_gauss, cached_gaussian = s.rng.get_state()
        return {
            "iter": s.iter,
            "error": {str(k): v.clone() for k, v in s.error_dict.items()},
            "p": {str(k): v.clone() for k, v in s.p_memory_dict.items()},
            "q": {str(k): v.clone() for k, v in s.q_memory_dict.items()},
            "numel_before_compression": s.total_numel_before_compression,
            "numel_after_compression": s.total_numel_after_compression,
            "rng": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"iter", "error", "p", "q", "numel_before_compression", "numel_after_compression", "rng"}
        if set(state) != expected:
            raise ValueError(f"ddp-powersgd: strategy state has keys {sorted(state)}, expected {sorted(expected)}")
        s = self.state
        s.iter = int(state["iter"])
        s.error_dict = {int(k): v.clone() for k, v in state["error"].items()}
        s.p_memory_dict = {int(k): v.clone() for k, v in state["p"].items()}
        s.q_memory_dict = {int(k): v.clone() for k, v in state["q"].items()}
        s.total_numel_before_compression = int(state["numel_before_compression"])
        s.total_numel_after_compression = int(state["numel_after_compression"])
        rng = state["rng"]
        s.rng.set_state(
            ("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached_gaussian"])
        )
        self._dense_until_rebuild = s.iter >= s.start_powerSGD_iter


class DDPStrategy(Strategy):
    def __init__(self, name: str, options: Any, group: dist.ProcessGroup | None, hook: Hook) -> None:
        self.name = name
        self.options = options
        self.comm = Comm(group)
        self.hook = hook
        self.ddp: DistributedDataParallel | None = None
        self._param_names: dict[int, str] = {}
        self._reductions: list[_BucketReduction] = []

    def attach(self, model: nn.Module) -> nn.Module:
        # names of the bare model (not DDP's "module." prefix), so per_layer keys match the other strategies
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        # forward_sync_buffers=False: buffers are not gradients and no other strategy syncs them per step, so the
        # bytes counted here stay comparable and complete (DDP still makes them equal once, at construction)
        self.ddp = DistributedDataParallel(
            model, process_group=self.comm.group, bucket_cap_mb=self.options.bucket_mb, forward_sync_buffers=False
        )
        self.ddp.register_comm_hook(self, type(self)._hook)
        return self.ddp

    def _hook(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        start = time.perf_counter()
        parts, fut = self.hook(self.comm.group, bucket, self._dense_parts)
        record = _BucketReduction(f"{self.name}/bucket{bucket.index()}", parts, start)
        self._reductions.append(record)

        def finished(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            record.end = time.perf_counter()
            return done.value()

        return fut.then(finished)

    def _dense_parts(self, bucket: dist.GradBucket) -> dict[str, int]:
        return {
            self._param_names[id(p)]: g.numel() * g.element_size()
            for p, g in zip(bucket.parameters(), bucket.gradients())
        }

    def synchronize(self) -> CommStats:
        """DDP has already reduced every bucket by the time backward() returns: account for them."""
        S = self.comm.world_size
        for r in self._reductions:
            if r.end is None:
                raise RuntimeError(f"{self.name}: {r.name} has not finished; call synchronize() after backward()")
            sent = sum(r.parts.values())
            self.comm.account(r.name, sent, sent, 2.0 * (S - 1) / S * sent, r.end - r.start, r.parts)
        self._reductions = []
        return self.comm.reset()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        if self.ddp is None:
            raise RuntimeError(f"{self.name}: no_sync() before attach()")
        with self.ddp.no_sync():
            yield

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "bucket_mb": self.options.bucket_mb, **self.hook.describe()}

    def rescale_memory(self, ratio: float) -> None:
        self.hook.rescale_memory(ratio)

    def state_dict(self) -> dict[str, Any]:
        return self.hook.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hook.load_state_dict(state)


def build_ddp(options: Any, group: dist.ProcessGroup | None = None) -> DDPStrategy:
    return DDPStrategy("ddp", options, group, AllReduceHook())


def build_ddp_powersgd(options: Any, group: dist.ProcessGroup | None = None) -> DDPStrategy:
    # (factor_dtype fp32 and start_step >= 2 are the registry's rules for this strategy)
    return DDPStrategy("ddp-powersgd", options, group, PowerSGDHook(options, group))

"""Count host syncs: the operations that make the host wait for the device, on any device (CPU included).

On CUDA the host runs ahead of the GPU; an operation whose result the host needs (a Python number from a tensor,
an output whose shape depends on the data, a copy into ordinary host memory) stops it until the GPU has done
everything queued, and the GPU then idles while the host queues the next work. On CPU the same operations cost
nothing special, so a sync added to a hot loop goes unnoticed there. `count_syncs()` counts them on any device by
the operation, what it would cost on CUDA:

- `aten._local_scalar_dense`: `Tensor.item()`, `bool(t)` (so `if t:`, `while t.any():`), `float(t)`, `int(t)`,
  and a tensor used as a Python index;
- operations whose output shape depends on the values: `nonzero` (and `torch.where(cond)`, `argwhere`),
  `masked_select`, indexing with a boolean mask (`t[mask]`, `t[mask] = v`), `unique*`, `repeat_interleave`
  without `output_size`, `bincount`; and `torch.equal`, which returns a Python bool;
- `Tensor.tolist()` and `Tensor.numpy()` (on CUDA they copy to the host first);
- a copy from a non-CPU device to the CPU (`.cpu()`, `.to("cpu")`, `.item()`'s CUDA copy is already counted),
  except `non_blocking=True` into pinned memory.

It counts with a `TorchDispatchMode` (the aten operations, also those called from C++ and from autograd hooks
on the calling thread) and, for the two methods that bypass the dispatcher on CPU, by wrapping `Tensor.tolist`
and `Tensor.numpy` while the block runs (in every thread); no result changes. `count_syncs(cuda_debug=True)`
also sets `torch.cuda.set_sync_debug_mode("warn")` and counts CUDA's own warnings (`cuda_warnings`), a second
opinion where a GPU is present (not exercised on the CPU-only machine this was written on).

    with count_syncs() as syncs:
        loss = model(x).sum(); loss.backward()
    print(syncs.total, syncs.by_op.most_common(), syncs.by_site.most_common(5))
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: aten operations that need a value or a data-dependent size on the host
SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.nonzero.out,
    _aten.masked_select.default,
    _aten.masked_select.out,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.bincount.default,
}
_BOOL_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
_REPEAT_INTERLEAVE = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
#: Tensor methods that read the data on the host without going through the dispatcher (on CPU)
HOST_READS = ("tolist", "numpy")

_SKIP_FILES = (str(Path(torch.__file__).parent), __file__)


@dataclass
class SyncCounter:
    total: int = 0
    by_op: Counter = field(default_factory=Counter)  # operation name -> count
    by_site: Counter = field(default_factory=Counter)  # "file:line" of the first caller outside torch -> count
    cuda_warnings: int = 0  # CUDA's sync debug warnings (count_syncs(cuda_debug=True) on CUDA only)
    _inside: int = 0  # >0 while a counted Python-level call runs (its own aten ops are not counted again)

    def add(self, name: str) -> None:
        self.total += 1
        self.by_op[name] += 1
        self.by_site[_caller()] += 1

    def __str__(self) -> str:
        ops = ", ".join(f"{name} {n}" for name, n in self.by_op.most_common())
        sites = ", ".join(f"{site} {n}" for site, n in self.by_site.most_common())
        return f"{self.total} host syncs ({ops}) at {sites or 'nowhere'}"


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FILES):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """A copy from a non-CPU tensor into CPU memory that the host must wait for."""
    if func is _aten._to_copy.default:
        src, dst_device = args[0], kwargs.get("device")
        pinned = kwargs.get("pin_memory", False)
    else:  # copy_(dst, src, non_blocking)
        dst, src = args[0], args[1]
        dst_device, pinned = dst.device, dst.device.type == "cpu" and dst.is_pinned()
    if not isinstance(src, torch.Tensor) or src.device.type == "cpu" or dst_device is None:
        return False
    non_blocking = kwargs.get("non_blocking", len(args) > 2 and bool(args[2]))
    return torch.device(dst_device).type == "cpu" and not (non_blocking and pinned)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.counter._inside:
            if (
                func in SYNC_OPS
                or (func in _BOOL_INDEX_OPS and _has_bool_index(args))
                or (func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None)
                or (func in _COPY_OPS and _device_to_host(func, args, kwargs))
            ):
                self.counter.add(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


@contextmanager
def _host_reads(counter: SyncCounter) -> Iterator[None]:
    """Wrap Tensor.tolist / Tensor.numpy for the block (these read CPU data without the dispatcher). A patch,
    not a TorchFunctionMode: a function mode is switched off inside the call it handles, hence for all of
    `loss.backward()`, where the adjoint's hooks run."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def wrap(name: str, method: Any) -> Any:
        def counted(self, *args, **kwargs):
            counter.add(f"Tensor.{name}")
            counter._inside += 1  # its own copy to the host (CUDA) is this sync, not another
            try:
                return method(self, *args, **kwargs)
            finally:
                counter._inside -= 1

        return counted

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


@contextmanager
def count_syncs(cuda_debug: bool = False) -> Iterator[SyncCounter]:
    """Count the host syncs of the code in the block (this thread, and autograd on it); see the module doc."""
    counter = SyncCounter()
    if not (cuda_debug and torch.cuda.is_available()):
        with _host_reads(counter), _Dispatch(counter):
            yield counter
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with _host_reads(counter), _Dispatch(counter):
                yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    ours = [w for w in caught if "synchroniz" in str(w.message)]
    counter.cuda_warnings = len(ours)
    for w in caught:  # hand the other warnings on
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

"""Timing a callable where its work runs: CUDA events on a GPU, the wall clock on the CPU.

On a GPU the host returns from most calls before the kernels have run, so a host clock would time the launches;
a pair of CUDA events recorded on the current stream around the call measures the device's own timeline between
them (host stalls inside the call included, since the stream then idles). On the CPU the work is done when the
call returns, so the wall clock is the same measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.clock = "CUDA events" if self.cuda else "wall clock"

    def seconds(self, fn: Callable[[], object]) -> float:
        """How long `fn()` took, in seconds."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
        """Median seconds of `repeats` calls after `warmup` untimed ones (allocations, kernel selection)."""
        for _ in range(warmup):
            fn()
        return statistics.median(self.seconds(fn) for _ in range(repeats))

"""Collectives with exact byte accounting.

Every strategy talks to other ranks only through `Comm`, so the bytes it reports are by construction the
bytes it handed to collectives:

- payload sent = elements x element size of every tensor passed to a collective (padding included);
- payload received = what the collective delivered from other ranks;
- wire bytes = what the collective's algorithm puts on this rank's link, estimated:
  ring all-reduce sends 2(S-1)/S x payload, all_gather (ring) sends (S-1) x own payload, all_to_all sends
  (S-1)/S x payload.

Time (`CommStats.time_s`) is the host time the step is blocked in collectives. On CUDA a collective's `wait()`
only orders streams and returns at once, so where a CUDA tensor is measured the clock is read after a
`torch.cuda.synchronize()`: the time is then the collective's, not the launch's. Nothing else synchronizes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..distributed import collective_device
from .base import CommStats
from .dtypes import decode_columns, encode_columns, quantized_layout


def _settle(tensor: torch.Tensor) -> None:
    """Before the clock is read: let the device finish the queued work on `tensor` (CUDA only)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class Comm:
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        # a CUDA-only backend (NCCL, "cuda:gloo") moves only CUDA tensors: small host-side values (row counts)
        # must live there too
        self.device = collective_device(group) if dist.is_initialized() else torch.device("cpu")
        self.stats = CommStats()

    # ------------------------------------------------------------------ accounting
    def reset(self) -> CommStats:
        """Return the stats gathered since the last reset, and start a new step."""
        stats, self.stats = self.stats, CommStats()
        return stats

    def account(
        self, name: str, sent: int, recv: int, wire: float, seconds: float, parts: Mapping[str, int] | None = None
    ) -> None:
        """`parts`: bytes_sent split by layer name, for a flat buffer that packs several layers (its values sum
        to `sent`); per_layer is charged by part instead of under `name`."""
        s = self.stats
        s.bytes_sent += sent
        s.bytes_recv += recv
        s.wire_bytes += wire
        s.time_s += seconds
        for key, nbytes in (parts or {name: sent}).items():
            s.per_layer[key] = s.per_layer.get(key, 0) + nbytes

    # ------------------------------------------------------------------ collectives
    def all_reduce_(
        self,
        tensor: torch.Tensor,
        name: str,
        op: dist.ReduceOp = dist.ReduceOp.SUM,
        parts: Mapping[str, int] | None = None,
    ) -> torch.Tensor:
        """In-place sum (default) over ranks. `parts`: see `account`."""
        nbytes = tensor.numel() * tensor.element_size()
        S = self.world_size
        _settle(tensor)  # queued compute that produced `tensor` is not communication
        t0 = time.perf_counter()
        if S > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
            _settle(tensor)
        self.account(name, nbytes, nbytes, 2.0 * (S - 1) / S * nbytes, time.perf_counter() - t0, parts)
        return tensor

    def all_gather(self, tensor: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Same-shaped tensors from every rank, in rank order."""
        return self.all_gather_async(tensor, name).wait()

    def all_gather_async(self, tensor: torch.Tensor, name: str) -> AsyncGather:
        """`all_gather` started now; its `wait()` returns the parts and charges the bytes."""
        return AsyncGather(self, tensor, name)

    def all_reduce_async(self, tensor: torch.Tensor, name: str, parts: Mapping[str, int] | None = None) -> AsyncReduce:
        """In-place sum over ranks, started now; its `wait()` returns the tensor and charges the bytes (`parts`:
        see `account`)."""
        return AsyncReduce(self, tensor, name, parts)

    def all_reduce_quantized_async(
        self, tensor: torch.Tensor, name: str, fmt: str, values_of: Mapping[str, int] | None = None
    ) -> AsyncQuantizedReduce:
        """Sum over ranks of a 1-D fp32 `tensor` sent in the 8-bit format `fmt` (int8, fp8), started now; its
        `wait()` returns the sum (bitwise the same on every rank), `delivered()` this rank's share of it. The
        wire carries 2(S−1)/S × the 8-bit payload, as a ring all-reduce of it would. `values_of`: the tensor's
        values split by layer name, for the per-layer bytes."""
        return AsyncQuantizedReduce(self, tensor, name, fmt, values_of)

    def exchange_counts(self, counts: list[int], name: str = "meta/counts") -> list[list[int]]:
        """All-gather a short list of ints (e.g. rows per layer): result[r] is rank r's list."""
        t = torch.tensor(counts, dtype=torch.int64, device=self.device)
        return [p.tolist() for p in self.all_gather(t, name)]


class _InFlight:
    """A collective started with async_op=True: the timing both kinds share.

    Bytes are accounted at `wait()`; seconds are the time spent in the launch call plus the wait (what the step
    was blocked on). `launched`/`done` are perf_counter stamps for the overlap benchmark; `done` is the first
    `poll()` or `wait()` that saw the collective complete. (No `Future.then` callback: a Python callable held by
    gloo's worker thread can be released there during interpreter shutdown, which aborts the process.)
    """

    def __init__(self, comm: Comm, name: str, nbytes: int, parts: Mapping[str, int] | None = None) -> None:
        self.comm, self.name, self.nbytes, self.parts_of = comm, name, nbytes, parts
        self.launched = time.perf_counter()
        self.done: float | None = None
        self.work: dist.Work | None = None
        self._accounted = False

    def _started(self, work: dist.Work | None) -> None:
        self.work = work
        if work is None:
            self.done = self.launched
        self.blocked = time.perf_counter() - self.launched

    def poll(self) -> None:
        if self.done is None and self.work is not None and self.work.is_completed():
            self.done = time.perf_counter()

    def drain(self) -> None:
        """Wait for the collective in flight without accounting it and start nothing (an error path: a collective
        started here would pair with whatever the other ranks call next)."""
        if self.work is not None:
            self.work.wait()

    def _complete(self, result: torch.Tensor, recv: int, wire: float) -> bool:
        """Wait for the collective (once) and charge it; False if it was already accounted."""
        if self._accounted:
            return False
        if self.work is not None:
            self.poll()
            t0 = time.perf_counter()
            self.work.wait()
            _settle(result)
            self.blocked += time.perf_counter() - t0
            if self.done is None:
                self.done = time.perf_counter()
        self.comm.account(self.name, self.nbytes, recv, wire, self.blocked, self.parts_of)
        self._accounted = True
        return True


class AsyncGather(_InFlight):
    """An all_gather in flight; `wait()` returns the parts (rank order) and charges `Comm`: (S−1) × payload."""

    def __init__(self, comm: Comm, tensor: torch.Tensor, name: str) -> None:
        tensor = tensor.contiguous()
        super().__init__(comm, name, tensor.numel() * tensor.element_size())
        if comm.world_size > 1:
            self.parts = [torch.empty_like(tensor) for _ in range(comm.world_size)]
            self._started(dist.all_gather(self.parts, tensor, group=comm.group, async_op=True))
        else:
            self.parts = [tensor]
            self._started(None)

    def wait(self) -> list[torch.Tensor]:
        others = (self.comm.world_size - 1) * self.nbytes
        self._complete(self.parts[0], others, others)
        return self.parts


class AsyncReduce(_InFlight):
    """A sum all_reduce in flight, in place in its tensor; `wait()` returns it and charges `Comm` as a ring:
    2(S−1)/S × payload on the wire."""

    def __init__(self, comm: Comm, tensor: torch.Tensor, name: str, parts: Mapping[str, int] | None = None) -> None:
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: all_reduce_async needs a contiguous tensor (it reduces in place)")
        _settle(tensor)  # queued compute that produced `tensor` is not communication
        super().__init__(comm, name, tensor.numel() * tensor.element_size(), parts)
        self.tensor = tensor
        S = comm.world_size
        self._started(dist.all_reduce(tensor, group=comm.group, async_op=True) if S > 1 else None)

    def wait(self) -> torch.Tensor:
        S = self.comm.world_size
        self._complete(self.tensor, self.nbytes, 2.0 * (S - 1) / S * self.nbytes)
        return self.tensor


class AsyncQuantizedReduce(_InFlight):
    """A sum over ranks in 8 bits: a reduce-scatter by all_to_all, then an all_gather of the reduced chunks.

    The tensor is padded to S chunks of whole blocks of at most 128 values (`dtypes.quantized_layout`), each block
    sent as 8-bit values with one fp32 scale (`encode_columns`, a block being a column). Rank j receives every
    rank's chunk j, decodes and sums them in fp32 in rank order, encodes that sum once more and all-gathers it:
    every rank decodes the same bytes, so the sum is bitwise the same everywhere. A ring all-reduce cannot carry
    8-bit values (their sum overflows, and the ranks' scales differ); this carries each value twice in 8 bits,
    2(S−1)/S × payload on the wire.

    Only two encodings lose anything, and each rank knows what its own lost: its chunks' first encoding, and the
    encoding of the sum it owns. `delivered()` is this rank's tensor plus those losses, so the ranks' delivered
    shares add up to the decoded sum (to fp32 rounding): error feedback that keeps `compensated − delivered()`
    absorbs the quantization exactly.
    """

    def __init__(
        self, comm: Comm, tensor: torch.Tensor, name: str, fmt: str, values_of: Mapping[str, int] | None
    ) -> None:
        if tensor.dim() != 1:
            raise ValueError(f"{name}: all_reduce_quantized_async takes a 1-D tensor, got shape {tuple(tensor.shape)}")
        S = comm.world_size
        self.fmt, self.numel = fmt, tensor.numel()
        self.blocks, self.block = quantized_layout(self.numel, S)
        padded = torch.zeros(S * self.blocks * self.block, dtype=torch.float32, device=tensor.device)
        padded[: self.numel] = tensor
        chunks = padded.view(S, self.blocks, self.block)
        self.send = torch.stack([encode_columns(chunk.T, fmt) for chunk in chunks])
        self._owner_loss: torch.Tensor | None = None  # what encoding the sum this rank owns lost (set in wait())
        payload = self.send.numel()
        super().__init__(comm, name, payload, _bytes_by_part(values_of, payload, self.numel))
        self.recv = torch.empty_like(self.send) if S > 1 else self.send
        _settle(self.send)
        self.launched = time.perf_counter()
        work = dist.all_to_all_single(self.recv, self.send, group=comm.group, async_op=True) if S > 1 else None
        self._started(work)
        self._sum: torch.Tensor | None = None

    def _decode(self, data: torch.Tensor) -> torch.Tensor:
        """One chunk's bytes back as its fp32 values, block after block."""
        return decode_columns(data, self.fmt, self.block, self.blocks).T.reshape(-1)

    def wait(self) -> torch.Tensor:
        if self._sum is not None:
            return self._sum
        comm, S = self.comm, self.comm.world_size
        if self.work is not None:
            self.poll()
            t0 = time.perf_counter()
            self.work.wait()
            _settle(self.recv)
            self.blocked += time.perf_counter() - t0
        owned = self._decode(self.recv[0])
        for row in self.recv[1:]:
            owned += self._decode(row)
        encoded = encode_columns(owned.view(self.blocks, self.block).T, self.fmt)
        self._owner_loss = self._decode(encoded) - owned
        t0 = time.perf_counter()
        if S > 1:
            parts = [torch.empty_like(encoded) for _ in range(S)]
            dist.all_gather(parts, encoded, group=comm.group)
            _settle(encoded)
        else:
            parts = [encoded]
        self.blocked += time.perf_counter() - t0
        self.done = time.perf_counter()  # the sum is complete only after the all_gather, not at the all_to_all
        self._sum = torch.cat([self._decode(part) for part in parts])[: self.numel]
        comm.account(self.name, self.nbytes, self.nbytes, 2.0 * (S - 1) / S * self.nbytes, self.blocked, self.parts_of)
        return self._sum

    def delivered(self) -> torch.Tensor:
        """This rank's share of the sum (waits for it): its tensor as its first encoding carried it, plus what
        encoding the sum it owns lost. Decoded only when asked for (error feedback): most sums never are."""
        self.wait()
        assert self._owner_loss is not None
        mine = torch.stack([self._decode(row) for row in self.send])
        mine[self.comm.rank] += self._owner_loss
        return mine.reshape(-1)[: self.numel]


def _bytes_by_part(values_of: Mapping[str, int] | None, payload: int, numel: int) -> dict[str, int] | None:
    """A payload of `payload` bytes for `numel` values split in proportion to `values_of` (whole bytes that sum to
    `payload`: the last part takes the padding and the rounding)."""
    if not values_of:
        return None
    names = list(values_of)
    parts = {n: payload * values_of[n] // max(numel, 1) for n in names[:-1]}
    parts[names[-1]] = payload - sum(parts.values())
    return parts

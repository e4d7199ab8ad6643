"""The overlap scheduler against fake captures and a fake Comm: which layer launches when, in what order, and
what it refuses. No process group, no model."""

from __future__ import annotations

import pytest
import torch

from dtrain.compression.codecs.base import LayerStep, Pending
from dtrain.compression.scheduler import LayerScheduler


class FakeCapture:
    def __init__(self, name: str, first_call: int | None, rows: int, calls: int = 1) -> None:
        self.name, self.first_call, self.forward_rows = name, first_call, rows
        self.pending = calls
        self.dense_grad_arrived = False
        self._recorded = 0
        self.taken = 0

    @property
    def recorded_rows(self) -> int:
        return self._recorded

    def deliver(self, rows: int) -> None:
        self._recorded += rows
        self.pending -= 1

    def take(self, reset_dense: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        rows, self._recorded = self._recorded, 0
        self.taken += 1
        return torch.zeros(rows, 3), torch.zeros(rows, 2)

    def reset_dense(self) -> None:
        self.dense_grad_arrived = False


class FakeComm:
    """World size 2: the peer's words are given; exchange_counts returns [mine, peer's]."""

    rank, world_size = 0, 2

    def __init__(self, peer: dict[str, list[int]]) -> None:
        self.peer = peer
        self.exchanges: list[str] = []

    def exchange_counts(self, counts: list[int], name: str = "meta/counts") -> list[list[int]]:
        self.exchanges.append(name)
        return [counts, self.peer.get(name, counts)]


class FakeGather:
    def __init__(self, nbytes: int) -> None:
        self.launched, self.done, self.nbytes = 0.0, None, nbytes
        self.waited = False

    def poll(self) -> None:
        pass

    def wait(self) -> list[torch.Tensor]:
        self.waited, self.done = True, 1.0
        return []

    def drain(self) -> None:
        self.drained = True


def make(captures, peer=None, overlap=True):
    comm = FakeComm(peer or {})
    launched: list[str] = []

    gathers: list[FakeGather] = []

    def launch(layer: LayerStep) -> Pending:
        launched.append(layer.capture.name)
        gathers.append(FakeGather(layer.a.shape[0]))
        return Pending(layer, gathers[-1])

    sched = LayerScheduler("test", comm, lambda: captures, launch, lambda: overlap)
    sched.test_gathers = gathers  # what each launch returned, for the tests to inspect
    return sched, comm, launched


def _word(rows: int, position: int) -> int:
    return (rows << 20) | position


def test_layers_launch_in_reverse_forward_order_as_their_last_delta_arrives():
    # forward called a, b, c: backward completes c first, so the launch order is c, b, a
    a, b, c = FakeCapture("a", 1, 4), FakeCapture("b", 2, 4, calls=2), FakeCapture("c", 3, 4)
    sched, comm, launched = make([a, b, c])
    c.deliver(4)
    sched.on_delta(c)
    assert launched == ["c"]
    b.deliver(2)
    sched.on_delta(b)
    assert launched == ["c"]  # b still waits for its second call's Δ
    a.deliver(4)
    sched.on_delta(a)
    assert launched == ["c"]  # a is ready but b comes first in the order: a rank never skips ahead
    b.deliver(2)
    sched.on_delta(b)
    assert launched == ["c", "b", "a"]
    finished: list[str] = []
    sched.finish_round(lambda ps: finished.extend(p.layer.capture.name for p in ps))
    assert finished == ["c", "b", "a"]
    assert comm.exchanges == ["meta/rows", "meta/dense"]
    assert sched.last_round.layers_in_backward == 3


def test_nothing_launches_early_when_the_ranks_orders_differ():
    a, b = FakeCapture("a", 1, 4), FakeCapture("b", 2, 4)
    # the peer's forward called b before a: its positions are swapped
    sched, _, launched = make([a, b], peer={"meta/rows": [_word(4, 0), _word(4, 1)]})
    b.deliver(4)
    sched.on_delta(b)
    a.deliver(4)
    sched.on_delta(a)
    assert launched == []
    finished: list[str] = []
    sched.finish_round(lambda ps: finished.extend(p.layer.capture.name for p in ps))
    assert finished == ["a", "b"]  # registration order, from finish_round
    assert sched.last_round.layers_in_backward == 0


def test_a_second_backward_after_launch_is_refused_and_nothing_is_left_in_flight():
    a = FakeCapture("a", 1, 4)
    sched, _, launched = make([a])
    a.deliver(4)
    sched.on_delta(a)
    a.pending += 1
    a.deliver(4)  # pairs of a second backward, after a's collective had started
    with pytest.raises(RuntimeError, match="recorded pairs after their collective had started"):
        sched.finish_round(lambda ps: None)
    assert a.recorded_rows == 0
    # waited out without wait(), which may start a collective of its own (an 8-bit sum's all_gather) that the
    # other ranks, not on this path, would pair with something else
    (gather,) = sched.test_gathers
    assert getattr(gather, "drained", False) and not gather.waited


def test_more_rows_than_announced_is_an_error():
    a = FakeCapture("a", 1, rows=2)
    sched, _, _ = make([a])
    a.deliver(5)
    with pytest.raises(RuntimeError, match="recorded 5 rows but its forward calls announced 2"):
        sched.on_delta(a)


def test_collect_exchanges_rows_and_dense_flags_in_one_collective():
    a, b = FakeCapture("a", 1, 3), FakeCapture("b", 2, 0)
    b.dense_grad_arrived = True
    a.deliver(3)
    sched, comm, _ = make([a, b], peer={"meta/counts": [5, 1, 0, 0]}, overlap=False)
    layers = sched.collect()
    assert comm.exchanges == ["meta/counts"]
    assert [layer.rows for layer in layers] == [[3, 5], [0, 1]]
    assert [layer.dense_anywhere for layer in layers] == [False, True]

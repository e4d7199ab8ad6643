"""The exact references the tests compare against, and the comparisons themselves.

The oracle of every exact strategy is plain autograd on one process over the whole global batch
(`oracle_grads`): the global batch does not depend on the world size (`toy_batch`), and each rank's loss is the
mean over its equal slice, so the mean over ranks of the local gradients is the global-batch gradient."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.models import TOY_LAYERS, seeded_encoder, toy_batch


def local_grads(
    global_batch: int, rank: int, world: int, steps: Iterable[int] = (0,), model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Plain autograd on one process: the gradient of rank `rank`'s slice of each step's global batch (the
    cross-entropy losses of several steps summed, as gradient accumulation sums them), from `seeded_encoder()`
    unless a model is given."""
    model = seeded_encoder() if model is None else model
    for step in steps:
        tokens, labels = toy_batch(step, global_batch, rank, world)
        F.cross_entropy(model(tokens), labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def oracle_grads(global_batch: int, steps: Iterable[int] = (0,)) -> dict[str, torch.Tensor]:
    """The gradient of the whole global batch on one process: what every exact strategy must deliver."""
    return local_grads(global_batch, 0, 1, steps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def weights_rel_error(
    grads: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], layers: Iterable[str] = TOY_LAYERS
) -> float:
    """`rel` of the captured layers' weight gradients, concatenated."""
    names = [f"{layer}.weight" for layer in layers]
    return rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([oracle[n].flatten() for n in names]))


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Same names, and `rel` of every tensor at most `tol`."""
    assert got.keys() == want.keys()
    errors = {n: rel(got[n], want[n]) for n in want}
    assert max(errors.values()) <= tol, errors


def assert_same_on_all_ranks(tensors: list[dict[str, torch.Tensor]]) -> None:
    """Bitwise: every rank's tensors equal rank 0's."""
    for r, t in enumerate(tensors[1:], 1):
        unequal = [n for n in tensors[0] if not torch.equal(tensors[0][n], t[n])]
        assert not unequal, f"rank {r} differs from rank 0 in {unequal}"


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest max |a - b| / max |a| over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-12)
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst

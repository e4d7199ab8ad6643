"""The rank k each captured layer's factors use, and what a budget re-plans them from.

`LayerRanks` holds comm.rank for every layer, or per-layer ranks a `plan.BudgetPlan` assigned, and the last
measured singular values of each layer's delivered gradient. `allocate` is the budget rule itself: the energy
captured per byte (the dAD paper's "introspection into training dynamics", used for control):

    start every layer at k = 1; then, while the budget allows, give one more rank to the layer whose next
    singular value σ_{k+1}² buys the most per byte of that layer's extra factor column

Beyond the measured spectrum σ_1..σ_m the values are extrapolated geometrically with the spectrum's own mean
decay, σ_j = σ_m · r^(j−m), r = (σ_m/σ_1)^(1/(m−1)) (at most 1), and a layer may at most double its rank
(plus one) per re-plan: a layer can grow past what it has shown, but not take the whole budget on a guess.
Without a measured spectrum every layer gets the same k, the largest that fits. Pure and deterministic: the
spectra are the same on every rank, so every rank allocates the same ranks.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .lowrank import clip_rank


class LayerRanks:
    def __init__(self, default: int) -> None:
        self.default = default
        self.per_layer: dict[str, int] = {}
        self.spectra: dict[str, torch.Tensor] = {}

    def rank(self, name: str | None, in_features: int, out_features: int, rows: int) -> int:
        k = self.per_layer.get(name, self.default) if name is not None else self.default
        return clip_rank(k, in_features, out_features, rows)

    def observe(self, name: str, sigma: torch.Tensor) -> None:
        """The singular values of a layer's delivered gradient this step (identical on every rank)."""
        self.spectra[name] = sigma.detach().double().cpu()


@dataclass(frozen=True)
class LayerCost:
    name: str
    k_max: int  # min(in, out, rows bound)
    bytes_per_rank: float  # wire bytes one more factor column costs per step


def allocate(
    layers: list[LayerCost],
    budget: float,
    spectra: dict[str, torch.Tensor],
    previous: dict[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks whose wire bytes fit `budget` (see the module docstring); `previous`: the ranks of the last
    allocation, which bound the growth. Raises ValueError if even k = 1 everywhere does not fit."""
    ranks = {layer.name: min(1, layer.k_max) for layer in layers}
    spent = sum(layer.bytes_per_rank * ranks[layer.name] for layer in layers)
    if spent > budget:
        raise ValueError(f"one rank per layer needs {spent:,.0f} B/step on the wire, above the budget {budget:,.0f} B")
    if not any(layer.name in spectra for layer in layers):
        k = 1
        while True:
            trial = {layer.name: min(k + 1, layer.k_max) for layer in layers}
            cost = sum(layer.bytes_per_rank * trial[layer.name] for layer in layers)
            if cost > budget or trial == ranks:
                return ranks
            ranks, k = trial, k + 1

    def gain(layer: LayerCost, j: int) -> float:
        """σ_j² (1-based j) of the layer, extrapolated beyond the measured spectrum; 0 where nothing was measured."""
        sigma = spectra.get(layer.name)
        if sigma is None or sigma.numel() == 0 or float(sigma[0]) <= 0.0:
            return 0.0
        m = sigma.numel()
        if j <= m:
            return float(sigma[j - 1]) ** 2
        last = float(sigma[-1])
        decay = min(1.0, (last / float(sigma[0])) ** (1.0 / (m - 1))) if m > 1 else 0.5
        return (last * decay ** (j - m)) ** 2

    def cap(layer: LayerCost) -> int:
        if previous is None or layer.name not in previous:
            return layer.k_max
        return min(layer.k_max, 2 * previous[layer.name] + 1)

    # a rank that puts no bytes on a wire (world size 1: there is no link) is free: the layer takes its cap
    for c in layers:
        if c.bytes_per_rank <= 0:
            ranks[c.name] = cap(c)
    # max-heap of (energy per byte of the next rank); ties broken by name, so every rank decides alike
    heap = [(-gain(c, 2) / c.bytes_per_rank, c.name, c) for c in layers if cap(c) > 1 and c.bytes_per_rank > 0]
    heapq.heapify(heap)
    while heap:
        _, name, layer = heapq.heappop(heap)
        if spent + layer.bytes_per_rank > budget:
            continue
        ranks[name] += 1
        spent += layer.bytes_per_rank
        if ranks[name] < cap(layer):
            heapq.heappush(heap, (-gain(layer, ranks[name] + 1) / layer.bytes_per_rank, name, layer))
    return ranks

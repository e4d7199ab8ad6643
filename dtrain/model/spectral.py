"""Functional spectral normalisation: W / σ(W), σ estimated by power iteration on a stored vector.

Unlike torch.nn.utils.parametrizations.spectral_norm this does not rename parameters (the weight stays
`<module>.weight`) and it advances the power iteration only when called, which FPSA does once per forward: the
normalised weight is then fixed for the whole fixed-point solve, so the map being iterated does not change
between iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: power iterations run when the vector is created, so the first forward already divides by a good σ
INIT_ITERS = 15


def init_vector(weight: torch.Tensor) -> torch.Tensor:
    """A left singular vector estimate u for `weight` [out, in].

    The start vector comes from a private generator: drawing from the global one would shift the initialisation
    of every later layer, and a vanilla and an FPSA model built from the same seed would no longer start equal.
    """
    start = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    with torch.no_grad():
        u = F.normalize(start.to(weight.device), dim=0)
        for _ in range(INIT_ITERS):
            u = F.normalize(weight @ F.normalize(weight.T @ u, dim=0), dim=0)
    return u


def normalise(weight: torch.Tensor, u: torch.Tensor, update: bool) -> torch.Tensor:
    """weight / σ with σ = uᵀ W v. With `update`, one power iteration first refines `u` in place.

    σ is differentiable in `weight` (u, v are constants), as in torch's spectral_norm.
    """
    with torch.no_grad():
        if update:
            u.copy_(F.normalize(weight @ F.normalize(weight.T @ u, dim=0), dim=0))
        v = F.normalize(weight.T @ u, dim=0)
    sigma = torch.dot(u, weight @ v)
    return weight / sigma

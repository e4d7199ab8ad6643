"""Fixed-point self-attention (FPSA): the attention pattern is iterated to a fixed point inside the layer.

With X the (layer-normed) layer input and V = W_V X computed once,

    F(Z) = X + W_O · concat_h softmax(Q_h K_hᵀ / (√d_h τ_h)) V_h,   Q = W_Q Z, K = W_K Z
    Z_0 = X,   Z_{k+1} = (1 - α) Z_k + α F(Z_k)                       (α = fpsa.damping)

(fpsa.reinject=False drops the "X +" for the ablation). Tokens stop and freeze one by one (see solver.py). The
layer returns Z* - X with re-injection, so one undamped iteration is exactly vanilla attention, and Z* without.
τ_h = exp(log_temperature_h) exists only with model.learned_temperature; otherwise τ_h = 1.

fpsa.backward picks how gradients reach the parameters; the forward VALUE is the solve's Z* in every mode:
- implicit: a no-grad solve, one differentiable step f(Z*) and the adjoint hook of implicit.py (memory does not
  grow with fpsa.max_iter);
- phantom: a no-grad solve, then fpsa.phantom_steps differentiable steps from Z*;
- bptt: the whole loop is differentiable (the exact reference; memory grows with iterations).
In implicit and phantom mode the differentiable steps give the gradient, and `Z* + (y - y.detach())` keeps the
value at Z*, so training and evaluation see the same function.

Rule for gradient-capturing strategies (dAD replaces each nn.Linear's forward with a Function that records the
input rows A and output-gradient rows Δ of every differentiable call, then rebuilds the weight gradient Δᵀ A):
- every differentiable use of q, k, v, o goes through the module call (`self.q(z)`), so it is recorded;
- the no-grad solve and the adjoint's Jᵀλ products use F.linear on DETACHED weights, so the strategy sees no
  call that is not part of the parameter gradient. In implicit mode each of q, k, v, o is called exactly once
  with grad per forward, plus (fpsa.jac_reg > 0, training) once more for q, k, o in the Jacobian penalty, whose
  second derivative the capture records as rows too.
With fpsa.spectral_norm, W_Q, W_K, W_O are divided by their largest singular value (spectral.py, once per
forward) and applied with F.linear on the normalised weight: those three then get plain autograd gradients and
their modules are never called; v is still called as a module.

The machinery is `FixedPointLoop`, over four projections that a subclass names with `projection(name)`:
`FixedPointAttention` owns q, k, v, o; `dtrain.hf.BertFixedPointAttention` uses a Hugging Face BERT layer's
query, key, value and output.dense, so the same solve, adjoint and capture rule run inside BERT.

Host syncs: the solve and the adjoint read their exit condition only where a solver.ExitSchedule says (one
per layer for the training forwards, one for the evaluation forwards, one in the adjoint record), about once
per solve once the usual count is learnt, and the statistics stay on the device until `fpsa_stats()` reads
them all at once. Results do not depend on the schedule (tests/unit/test_host_syncs.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import FPSAConfig

from . import spectral
from .attention import attend, key_padding_bias, merge_heads, split_heads
from .implicit import AdjointRecord, attach_adjoint
from .solver import ExitSchedule, SolveStats, solve

Linear = Callable[[torch.Tensor], torch.Tensor]
_LOOP_PROJECTIONS = ("q", "k", "o")  # the projections applied inside the loop (v is applied once, to X)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@dataclass
class _LoopMaps:
    """The projections and the per-head attention scale that one application of f uses."""

    q: Linear
    k: Linear
    o: Linear
    scale: torch.Tensor | float


class FixedPointLoop(nn.Module):
    """The FPSA map, its solve and its gradient path, over four projections a subclass provides.

    `projection(name)` returns the nn.Linear used as W_Q, W_K, W_V or W_O (`name` in q, k, v, o): the layer's own
    (`FixedPointAttention`) or another model's (`dtrain.hf`: the query, key, value and output.dense of a Hugging
    Face BERT layer, whose parameter names stay as they are). Subclasses call `_init_spectral()` once their
    projections exist. `forward` is the subclass's; `fixed_point(x, real, bias)` is the layer.
    """

    def __init__(self, n_heads: int, cfg: FPSAConfig, learned_temperature: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.cfg = cfg
        self.log_temperature = nn.Parameter(torch.zeros(n_heads)) if learned_temperature else None
        self.last_solve: SolveStats | None = None
        self.last_adjoint = AdjointRecord()
        # fpsa.jac_reg: the last training forward's Jacobian penalty (a differentiable scalar), else None
        self.jac_penalty: torch.Tensor | None = None
        # when the forward solve reads its exit condition: one schedule for training and one for evaluation
        # forwards, which see different batches (plain attributes, not state: they only decide how many
        # no-op iterations run, never the results)
        self.solve_schedules = {True: ExitSchedule(), False: ExitSchedule()}

    def projection(self, name: str) -> nn.Linear:
        """The projection `name` (q, k, v or o)."""
        raise NotImplementedError

    def _init_spectral(self) -> None:
        """With fpsa.spectral_norm: the power-iteration vectors of W_Q, W_K, W_O (buffers `<name>_sigma_u`)."""
        if self.cfg.spectral_norm:
            for name in _LOOP_PROJECTIONS:
                self.register_buffer(f"{name}_sigma_u", spectral.init_vector(self.projection(name).weight))

    # ------------------------------------------------------------------------------------------ the map f

    def _scale(self) -> torch.Tensor | float:
        base = 1.0 / math.sqrt(self.projection("q").in_features // self.n_heads)
        if self.log_temperature is None:
            return base
        return base * torch.exp(-self.log_temperature)[:, None, None]

    def _loop_weights(self) -> dict[str, torch.Tensor]:
        """W_Q, W_K, W_O for this forward, spectrally normalised once here when configured."""
        weights = {name: self.projection(name).weight for name in _LOOP_PROJECTIONS}
        if self.cfg.spectral_norm:
            weights = {
                name: spectral.normalise(w, getattr(self, f"{name}_sigma_u"), update=self.training)
                for name, w in weights.items()
            }
        return weights

    def _live_maps(self, weights: dict[str, torch.Tensor], scale: torch.Tensor | float) -> _LoopMaps:
        """The maps whose parameter gradients are wanted: module calls (F.linear on normalised weights with SN)."""
        if not self.cfg.spectral_norm:
            return _LoopMaps(q=self.projection("q"), k=self.projection("k"), o=self.projection("o"), scale=scale)
        fns = {name: partial(F.linear, weight=weights[name], bias=self.projection(name).bias) for name in weights}
        return _LoopMaps(**fns, scale=scale)

    def _frozen_maps(self, weights: dict[str, torch.Tensor], scale: torch.Tensor | float) -> _LoopMaps:
        """The same maps on detached parameters: for the no-grad solve and the adjoint's Jᵀλ products."""
        fns = {
            name: partial(F.linear, weight=weights[name].detach(), bias=_detached(self.projection(name).bias))
            for name in weights
        }
        return _LoopMaps(**fns, scale=scale.detach() if isinstance(scale, torch.Tensor) else scale)

    def update(self, maps: _LoopMaps, z: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """U(z) = W_O concat_h softmax(Q_h K_hᵀ scale) V_h; v is [B, H, L, d_h]."""
        q, k = split_heads(maps.q(z), self.n_heads), split_heads(maps.k(z), self.n_heads)
        return maps.o(merge_heads(attend(q, k, v, bias, maps.scale)))

    def step(
        self, maps: _LoopMaps, z: torch.Tensor, x: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """One damped iteration (1 - α) z + α F(z)."""
        update = self.update(maps, z, v, bias)
        target = x + update if self.cfg.reinject else update
        alpha = self.cfg.damping
        return (1 - alpha) * z + alpha * target

    def _jacobian_penalty(
        self,
        z_star: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        real: torch.Tensor,
        weights: dict[str, torch.Tensor],
        scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """Hutchinson estimate of ‖K‖²_F / (real tokens x d_model) at Z*, K = ∂U/∂Z the Jacobian of the undamped
        map (the damping only shifts J = (1 - α) I + α K): E‖εᵀK‖² = ‖K‖²_F for ε ~ N(0, I), one sample per
        forward. Differentiable in the parameters and V (create_graph), as in Bai et al. 2021. Through the live
        maps: a capturing strategy records the penalty's weight gradient as rows of q, k and o (capture.py, second
        derivatives), so rank-dAD compresses it with the rest of the layer's gradient."""
        z = z_star.detach().requires_grad_()
        u = self.update(self._live_maps(weights, scale), z, v, bias)
        eps = torch.randn_like(z) * real[..., None].to(z.dtype)
        (eps_k,) = torch.autograd.grad(u, z, eps, create_graph=True)
        return eps_k.pow(2).sum() / (real.sum() * z.shape[-1]).clamp_min(1)

    # ------------------------------------------------------------------------------------------ forward

    def fixed_point(self, x: torch.Tensor, real: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer on its input x [B, L, D]: Z* - X with re-injection, Z* without. `real`: bool [B, L], the
        tokens that iterate (padding never does); `bias`: the additive attention bias (broadcast to the scores
        [B, H, L, L]) or None."""
        cfg = self.cfg
        v = split_heads(self.projection("v")(x), self.n_heads)
        weights, scale = self._loop_weights(), self._scale()
        differentiable = torch.is_grad_enabled()
        schedule = self.solve_schedules[self.training]

        def fixed_point(maps, x0: torch.Tensor, v0: torch.Tensor):
            """The solve from x0 with the attention maps `maps` (live: differentiable; frozen: detached)."""

            def step(z: torch.Tensor) -> torch.Tensor:
                return self.step(maps, z, x0, v0, bias)

            return solve(step, x0, real, cfg.tol, cfg.max_iter, schedule, cfg.damping, cfg.anderson_memory)

        if differentiable and cfg.backward == "bptt":
            z, self.last_solve = fixed_point(self._live_maps(weights, scale), x, v)
        else:
            frozen = self._frozen_maps(weights, scale)
            with torch.no_grad():
                z, self.last_solve = fixed_point(frozen, x.detach(), v.detach())
            if differentiable:
                z = self._gradient_path(z, x, v, bias, self._live_maps(weights, scale), frozen)
        self.jac_penalty = None
        if differentiable and self.training and cfg.jac_reg > 0:
            self.jac_penalty = self._jacobian_penalty(z.detach(), v, bias, real, weights, scale)
        return z - x if cfg.reinject else z

    def _gradient_path(
        self,
        z_star: torch.Tensor,
        x: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        live: _LoopMaps,
        frozen: _LoopMaps,
    ) -> torch.Tensor:
        """Z* in value, with the gradient of the implicit or phantom backward."""
        cfg = self.cfg
        if cfg.backward == "implicit":
            y = self.step(live, z_star, x, v, bias)
            if y.requires_grad:
                x_const, v_const = x.detach(), v.detach()
                attach_adjoint(
                    y,
                    lambda z: self.step(frozen, z, x_const, v_const, bias),
                    z_star,
                    cfg.adj_max_iter,
                    cfg.adj_tol,
                    self.last_adjoint,
                    damping=cfg.damping,
                    memory=cfg.anderson_memory,
                )
        else:
            y = z_star
            for _ in range(cfg.phantom_steps):
                y = self.step(live, y, x, v, bias)
        return z_star + (y - y.detach())


class FixedPointAttention(FixedPointLoop):
    """dtrain's FPSA layer: it owns its projections q, k, v, o (d_model x d_model; k without bias), the same
    parameters as `VanillaAttention`, and takes the boolean key mask (True = real token) of dtrain's models."""

    def __init__(self, d_model: int, n_heads: int, cfg: FPSAConfig, learned_temperature: bool = False) -> None:
        super().__init__(n_heads, cfg, learned_temperature)
        self.q = nn.Linear(d_model, d_model)
        # no key bias: it shifts every logit of a query by the same amount, so softmax ignores it and its
        # gradient is exactly 0 (only float noise, which Adam would amplify into steps)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self._init_spectral()

    def projection(self, name: str) -> nn.Linear:
        return getattr(self, name)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.fixed_point(x, real, key_padding_bias(mask, x.dtype))

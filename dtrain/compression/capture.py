"""Capture of (A, Δ) pairs for dAD-managed `nn.Linear` layers.

For y = x Wᵀ + b the weight gradient is Δᵀ A, with A the input and Δ = ∂L/∂y, both flattened over all
leading dimensions (batch, sequence, ...) to rows. dAD strategies communicate (A, Δ), or low-rank factors
of Δᵀ A, instead of the gradient, so the local out×in weight gradient is never needed. `attach_linears`
swaps each managed module's forward for `CapturedLinearFn`, whose backward

- returns the input gradient and the bias gradient (the bias stays an ordinary parameter, all-reduced by
  the strategy: that is exactly Σ Δᵀ1),
- returns None for the weight, so autograd never forms the local weight gradient,
- records this call's (A, Δ) pair. A module called several times in one forward (an unrolled fixed-point
  iteration, BPTT) records one pair per call; each Δ is paired with its own call's A, so the rows of all
  calls concatenated give Σ_calls Δᵀ A exactly, whatever order backward visits them in.

A pair is recorded only when the running backward accumulates into the weight (loss.backward(), or
autograd.grad with the weight among its inputs). A nested autograd.grad(f, z) that only asks for a
vector-Jacobian product w.r.t. activations (the implicit adjoint solve of a fixed-point layer) runs
through the same backward but must not contribute to the weight gradient, and so records nothing.

If the weight also receives an ordinary gradient through another path (F.linear(x, layer.weight)
elsewhere, weight tying), autograd accumulates that part into weight.grad as usual and
`LinearCapture.dense_grad_arrived` says so, so the strategy can add it (all-reduced) to stay exact.

Second derivatives (a loss that contains a vector-Jacobian product made with create_graph, such as FPSA's
Jacobian penalty) stay in the same form: the input gradient Δ W of a captured call is then itself a captured
call, whose weight gradient gᵀ ∂L/∂y is recorded as rows (A = ∂L/∂y, Δ = g) when the outer backward runs.
A call whose output the loss does not depend on in the end (the penalty's last projection: only its
transposed product enters the penalty) never delivers its Δ; its layer's `pending` then stays above 0 and an
overlapping strategy launches it after backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize


class CallClock:
    """A counter shared by the captures of one model: the order of their first grad-enabled call in forward."""

    def __init__(self) -> None:
        self.ticks = 0

    def tick(self) -> int:
        self.ticks += 1
        return self.ticks


class LinearCapture:
    """The (A, Δ) pairs recorded for one managed weight since the last `take()`.

    Several modules sharing one weight Parameter share one capture: their rows add up like calls.
    """

    def __init__(self, name: str, weight: nn.Parameter, clock: CallClock | None = None) -> None:
        self.name = name
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.modules: list[nn.Linear] = []
        self._inputs: list[torch.Tensor] = []
        self._deltas: list[torch.Tensor] = []
        self.clock = clock if clock is not None else CallClock()
        #: grad-enabled calls whose Δ has not arrived yet; 0 after the last one arrives (if it does)
        self.pending = 0
        #: rows (leading dimensions flattened) of the grad-enabled calls since the last `take()`: known after
        #: forward, before any Δ arrives (what an overlapping strategy exchanges at the start of backward)
        self.forward_rows = 0
        #: `clock` tick of the first grad-enabled call since the last `take()` (None: no call): captures
        #: called later in forward usually deliver their last Δ earlier in backward
        self.first_call: int | None = None
        #: True once an ordinary (non-captured) gradient was accumulated into weight.grad this step
        self.dense_grad_arrived = False
        #: optional callback fired in backward right after each recorded Δ (dad/rankdad with comm.overlap
        #: start a layer's collective there); `pending == 0` tells that every recorded call has delivered
        self.on_delta: Callable[[LinearCapture], None] | None = None
        self._hook = weight.register_hook(self._note_dense_grad)

    def _note_dense_grad(self, grad: torch.Tensor | None) -> None:
        # called with None when the captured path is the only one (it returns no weight gradient)
        if grad is not None:
            self.dense_grad_arrived = True

    def record(self, a: torch.Tensor, delta: torch.Tensor) -> None:
        # saved inputs keep requires_grad; detached, later products build no graph
        self._inputs.append(a.detach())
        self._deltas.append(delta.detach())
        self.pending -= 1
        if self.on_delta is not None:
            self.on_delta(self)

    @property
    def recorded_rows(self) -> int:
        """Rows recorded since the last `take()`."""
        return sum(a.shape[0] for a in self._inputs)

    def called(self, rows: int) -> None:
        """A grad-enabled forward call with `rows` rows (its Δ is now pending)."""
        self.pending += 1
        self.forward_rows += rows
        if self.first_call is None:
            self.first_call = self.clock.tick()

    def take(self, reset_dense: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Δ) of every recorded call stacked along rows ((rows, in), (rows, out)); starts a new step.

        Both in one dtype: the widest recorded (the weight's in fp32 training, the autocast dtype under autocast,
        so 16-bit rows stay 16-bit). `reset_dense=False` keeps `dense_grad_arrived` (a strategy taking the pairs
        during backward reads the flag after backward and resets it with `reset_dense()`)."""
        w = self.weight
        recorded = self._inputs + self._deltas
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in recorded]) if recorded else w.dtype
        if len(self._inputs) == 1:  # the usual case: no copy
            a, delta = self._inputs[0].to(dtype), self._deltas[0].to(dtype)
        elif self._inputs:
            a = torch.cat(self._inputs).to(dtype)
            delta = torch.cat(self._deltas).to(dtype)
        else:
            a = w.new_zeros((0, self.in_features))
            delta = w.new_zeros((0, self.out_features))
        self._inputs, self._deltas = [], []
        self.pending = 0
        self.forward_rows = 0
        self.first_call = None
        if reset_dense:
            self.dense_grad_arrived = False
        return a, delta

    def reset_dense(self) -> None:
        self.dense_grad_arrived = False

    def remove(self) -> None:
        """Restore the modules' own forward and drop the gradient hook."""
        for module in self.modules:
            if "forward" in module.__dict__:
                del module.forward
        self.modules = []
        self._hook.remove()
        self._inputs, self._deltas = [], []


class CapturedLinearFn(torch.autograd.Function):
    """F.linear whose backward records (A, Δ) and returns no weight gradient.

    Under autocast it computes what autocast's F.linear computes: input, weight and bias cast to the autocast
    dtype, the product in that dtype. It then records A and Δ in that dtype too (16-bit rows on the wire).

    Twice differentiable: under create_graph (a Jacobian penalty differentiates a vector-Jacobian product) the
    input gradient Δ W is itself a captured call, `CapturedTransposedFn`, so the weight's share of the second
    derivative also arrives as recorded rows, never as a dense gradient."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, capture: LinearCapture
    ) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = F.linear(x, weight.to(dtype), bias)
        else:
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.capture = capture
        # the weight's gradient accumulator: backward asks the engine whether it will run in this pass
        ctx.weight_node = get_gradient_edge(weight).node
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        capture: LinearCapture = ctx.capture
        grad_x = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: the product must stay differentiable in the weight
                grad_x = _captured_call(CapturedTransposedFn, grad_out, weight, capture, capture.out_features)
            else:
                grad_x = grad_out.matmul(weight.to(grad_out.dtype))
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if torch._C._will_engine_execute_node(ctx.weight_node):
            capture.record(x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1]))
        return grad_x, None, grad_b, None


class CapturedTransposedFn(torch.autograd.Function):
    """y = g W (g: [..., out], y: [..., in]), the input gradient of a captured call, as a captured call of its own:
    ∂L/∂W = gᵀ (∂L/∂y), so its backward records A = ∂L/∂y, Δ = g (the same Δᵀ A form) and returns no weight
    gradient."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, weight: torch.Tensor, capture: LinearCapture) -> torch.Tensor:
        ctx.save_for_backward(g, weight)
        ctx.capture = capture
        ctx.weight_node = get_gradient_edge(weight).node
        return g.matmul(weight.to(g.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        g, weight = ctx.saved_tensors
        grad_g = grad_y.matmul(weight.to(grad_y.dtype).T) if ctx.needs_input_grad[0] else None
        if torch._C._will_engine_execute_node(ctx.weight_node):
            ctx.capture.record(grad_y.reshape(-1, grad_y.shape[-1]), g.reshape(-1, g.shape[-1]))
        return grad_g, None, None


def _captured_call(
    fn: type[torch.autograd.Function], x: torch.Tensor, weight: torch.Tensor, capture: LinearCapture, width: int, *rest
) -> torch.Tensor:
    """`fn` applied to x (rows of `width` features) as one grad-enabled call of `capture` (its Δ is now pending)."""
    capture.called(x.numel() // width if width else 0)
    return fn.apply(x, weight, *rest, capture)


def _captured_forward(module: nn.Linear, capture: LinearCapture) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and module.weight.requires_grad:
            return _captured_call(CapturedLinearFn, x, module.weight, capture, capture.in_features, module.bias)
        return F.linear(x, module.weight, module.bias)

    return forward


def _plain_trainable_weight(module: nn.Linear) -> bool:
    # a parametrized weight (spectral norm) is computed from other parameters: returning no gradient
    # for it would starve those, so such layers stay with ordinary autograd
    weight = module.weight
    return isinstance(weight, nn.Parameter) and weight.requires_grad and not parametrize.is_parametrized(module)


def attach_linears(model: nn.Module, skip: frozenset[str] = frozenset()) -> list[LinearCapture]:
    """Capture every `nn.Linear` of `model` whose weight is trainable, except modules named in `skip`.

    One capture per distinct weight Parameter, named after the first module that uses it, in
    `named_modules()` order (identical on every rank). Parameter names do not change: only the module
    instance's `forward` attribute is set, and `LinearCapture.remove()` deletes it again.
    """
    by_weight: dict[int, LinearCapture] = {}
    clock = CallClock()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in skip or not _plain_trainable_weight(module):
            continue
        capture = by_weight.get(id(module.weight))
        if capture is None:
            capture = by_weight[id(module.weight)] = LinearCapture(name, module.weight, clock)
        module.forward = _captured_forward(module, capture)
        capture.modules.append(module)
    return list(by_weight.values())


class GradientSource:
    """Where a dAD-family strategy's gradients come from: the captures of every managed Linear weight, and the
    rest of the trainable parameters (biases, norms, embeddings, uncaptured layers), whose gradients autograd
    forms densely as usual. Both lists are in registration order, the same on every rank."""

    def __init__(self, model: nn.Module) -> None:
        self.captures = attach_linears(model)
        managed = {id(c.weight) for c in self.captures}
        self.rest: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed
        ]

    def release(self, capture: LinearCapture, a: torch.Tensor, delta: torch.Tensor) -> None:
        """Hand a layer back to autograd; it joins the rest. This step's gradient is formed from its pair."""
        local = (delta.T @ a).to(capture.weight.dtype)
        capture.weight.grad = local if capture.weight.grad is None else capture.weight.grad + local
        capture.remove()
        self.rest.append((f"{capture.name}.weight", capture.weight))
        self.captures = [c for c in self.captures if c is not capture]

    def close(self) -> None:
        for capture in self.captures:
            capture.remove()
        self.captures = []

"""Mixed precision without a process group: the captured Linear under autocast computes what autocast computes,
records 16-bit rows, and lossy strategies rescale their error feedback with the loss scale."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dtrain.compression import build_strategy
from dtrain.compression.capture import attach_linears
from dtrain.config import CommConfig
from dtrain.precision import Precision
from tests.helpers.models import ToyEncoder, toy_batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_captured_linear_under_autocast_matches_autocast_and_records_16_bit_rows(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    plain = copy.deepcopy(model)
    captures = attach_linears(model)
    x = torch.randn(4, 7, 6, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out, out_plain = model(x), plain(x_plain)
    assert out.dtype == out_plain.dtype == dtype
    assert torch.equal(out, out_plain)
    out.float().square().sum().backward()
    out_plain.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=0, atol=0)
    for capture, layer in zip(captures, (plain[0], plain[2])):
        a, delta = capture.take()
        assert a.dtype == delta.dtype == dtype and a.shape[0] == 28
        # autocast's own weight gradient is the 16-bit product; Δᵀ A in fp32 is the same to 16-bit rounding
        torch.testing.assert_close((delta.float().T @ a.float()), layer.weight.grad, rtol=2e-2, atol=2e-2)


def test_dad_under_bf16_autocast_sends_half_the_row_bytes():
    sent = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = ToyEncoder()
        strategy = build_strategy(CommConfig(strategy="dad"))
        strategy.attach(model)
        tokens, labels = toy_batch(0, 8, 0, 1)
        with Precision(precision, torch.device("cpu")).autocast():
            loss = F.cross_entropy(model(tokens).float(), labels)
        loss.backward()
        stats = strategy.synchronize()
        sent[precision] = {c.name: stats.per_layer[c.name] for c in strategy.captures}
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        strategy.close()
    assert {n: b // 2 for n, b in sent["fp32"].items()} == sent["bf16"]


@pytest.mark.parametrize("name", ["powersgd", "rankdad", "ddp-powersgd"])
def test_error_feedback_follows_the_loss_scale(name):
    strategy = build_strategy(CommConfig(strategy=name, rank=1))
    if name == "powersgd":
        memory = strategy.residuals
    elif name == "rankdad":
        (codec,) = strategy.plan.codecs()
        memory = codec.memory.residuals
    else:
        strategy.hook.state.error_dict[0] = torch.ones(3)
        strategy.rescale_memory(0.5)
        assert strategy.hook.state.error_dict[0].tolist() == [0.5] * 3
        return
    memory.put("w", torch.ones(2, 2))
    strategy.rescale_memory(0.25)
    assert memory.get("w").tolist() == [[0.25, 0.25], [0.25, 0.25]]


def test_fp16_scaler_shrinks_on_overflow_and_tells_the_strategy():
    class Recorder:
        ratios: list[float] = []

        def rescale_memory(self, ratio: float) -> None:
            self.ratios.append(ratio)

    p = Precision("fp16", torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    p.scale((w * float("inf")).sum()).backward()
    p.unscale_(opt)
    p.step(opt)  # skipped: the gradient overflowed
    assert torch.equal(w.detach(), torch.ones(2))
    recorder = Recorder()
    p.update(recorder)
    assert recorder.ratios == [0.5] and p.scaler.get_scale() == 2.0**15

"""The example codec of docs/architecture.md, run from the document itself: its gradients are plain autograd's."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dtrain.config import CommConfig
from tests.helpers.models import ToyEncoder, toy_batch

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def example_namespace() -> dict:
    """Every python block of the doc's "Adding a codec" section, executed in order."""
    section = DOC.read_text().split("## Adding a codec", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_documented_codec_gives_the_plain_autograd_gradient():
    ns = example_namespace()
    torch.manual_seed(0)
    model = ToyEncoder()
    plain = copy.deepcopy(model)
    strategy = ns["build_dense"](CommConfig(strategy="dad").options())
    strategy.attach(model)
    tokens, labels = toy_batch(0, 8, 0, 1)
    F.cross_entropy(model(tokens), labels).backward()
    stats = strategy.synchronize()
    F.cross_entropy(plain(tokens), labels).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    # every captured layer went through the codec: its bytes are the dense gradient's, fp32
    for capture in strategy.captures:
        assert stats.per_layer[capture.name] == capture.in_features * capture.out_features * 4
    strategy.close()

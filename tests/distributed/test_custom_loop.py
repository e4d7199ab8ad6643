"""examples/custom_loop.py on 2 gloo ranks: a Hugging Face BertForMaskedLM (a model dtrain did not build) trained in
the user's own loop through build_strategy / attach / backward / synchronize / step.

dad must give allreduce's trained parameters (< 1e-5 relative, dropout 0; also with FPSA swapped in, and with
gradient accumulation through no_sync; BERT's key biases, whose exact gradient is 0, absolutely), and its bytes
per step must equal the closed form of docs/dad.md, computed here from the model's shapes and the rows:
16·L + Σ_layers N·(in+out)·4 + 4·Σ_rest numel + 4·in·out for the decoder, whose weight is tied to the word
embedding (an ordinary gradient arrives there through the embedding lookup). rankdad runs too (lossy: not compared
with allreduce), with its own closed form (k·(in+out)·4 per layer).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tests.helpers.oracles import assert_same_on_all_ranks, max_rel_diff  # noqa: E402
from tests.helpers.ranks import cached, run_ranks  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loop.py"
WORLD = 2
BATCH, SEQ_LEN, RANK_K = 8, 12, 4
COMMON = [
    "--steps", "4", "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--vocab", "48", "--hidden", "32",
    "--layers", "2", "--heads", "4", "--dropout", "0", "--rank", str(RANK_K), "--quiet",
]  # fmt: skip
RUNS = {
    "allreduce": ["--strategy", "allreduce"],
    "dad": ["--strategy", "dad"],
    "rankdad": ["--strategy", "rankdad"],
    "allreduce-fpsa": ["--strategy", "allreduce", "--fpsa"],
    "dad-fpsa": ["--strategy", "dad", "--fpsa"],
    "allreduce-accum": ["--strategy", "allreduce", "--grad-accum", "2"],
    "dad-accum": ["--strategy", "dad", "--grad-accum", "2"],
}


def example() -> ModuleType:
    name = "custom_loop_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _train(rank: int, world: int) -> dict:
    out = {}
    for name, argv in RUNS.items():
        result = example().main(COMMON + argv)
        out[name] = {
            "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
            "sent": [s.bytes_sent for s in result.stats],
            "losses": result.losses,
            "allreduce_bytes": result.allreduce_bytes,
        }
    return out


@cached
def _run(world: int) -> list[dict]:
    return run_ranks(_train, world)


def closed_form(strategy: str, argv: list[str], world: int) -> int:
    """Bytes one rank sends per step, from the shapes (docs/dad.md, "Bytes per step"), not from dtrain's counters."""
    module = example()
    model = module.build_model(module.parse_args(COMMON + argv))
    rows = BATCH // world * SEQ_LEN  # every Linear sees every token of the rank's share (padding included)
    linears = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            linears.setdefault(id(m.weight), m.weight)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    unique = {id(p): p for p in model.parameters()}
    rest = sum(p.numel() for i, p in unique.items() if i not in linears)
    per_layer = 0
    for w in linears.values():
        out_f, in_f = w.shape
        width = rows if strategy == "dad" else min(RANK_K, in_f, out_f, rows)
        per_layer += width * (in_f + out_f) * 4
        if id(w) in embedded:  # tied: the embedding's gradient is all-reduced on top
            per_layer += in_f * out_f * 4
    assert sum(1 for w in linears.values() if id(w) in embedded) == 1  # the MLM decoder, tied to the word embedding
    return 16 * len(linears) + per_layer + 4 * rest


@pytest.mark.parametrize("variant", ["", "-fpsa", "-accum"], ids=["plain", "fpsa", "accum"])
def test_dad_trains_bert_like_allreduce(variant: str) -> None:
    ranks = _run(WORLD)
    dad, allreduce = (ranks[0][f"{s}{variant}"]["state"] for s in ("dad", "allreduce"))
    assert_same_on_all_ranks([r[f"dad{variant}"]["state"] for r in ranks])
    assert_same_on_all_ranks([r[f"allreduce{variant}"]["state"] for r in ranks])
    # BERT's key biases get only float noise as gradient (their exact gradient is 0: softmax ignores a shift of a
    # query's logits), so they stay near 0 and a relative figure means nothing there: they are compared absolutely
    noise = [k for k in dad if k.endswith("attention.self.key.bias")]
    assert len(noise) == 2
    assert max((dad[k] - allreduce[k]).abs().max().item() for k in noise) < 1e-6
    kept = [k for k in dad if k not in noise]
    diff = max_rel_diff({k: allreduce[k] for k in kept}, {k: dad[k] for k in kept})
    assert diff < 1e-5, diff
    initial = example().build_model(example().parse_args(COMMON))
    assert max_rel_diff(initial.state_dict(), dad) > 1e-3  # it did train


@pytest.mark.parametrize("run", ["dad", "dad-fpsa", "dad-accum", "rankdad"])
def test_bytes_per_step_equal_the_closed_form(run: str) -> None:
    want = closed_form(run.split("-")[0], RUNS[run], WORLD)
    for rank in _run(WORLD):
        assert rank[run]["sent"] == [want] * 4


def test_allreduce_sends_every_gradient_once() -> None:
    for rank in _run(WORLD):
        stats = rank["allreduce"]
        assert stats["sent"] == [stats["allreduce_bytes"]] * 4


def test_rankdad_trains_and_replicas_agree() -> None:
    ranks = _run(WORLD)
    assert_same_on_all_ranks([r["rankdad"]["state"] for r in ranks])
    losses = ranks[0]["rankdad"]["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(t).all() for t in ranks[0]["rankdad"]["state"].values())

"""dtrain.hf: FPSA swapped into Hugging Face BERT (same parameters, one undamped iteration = BERT's attention, masks,
gradients) and model.family=hf-bert through build_model (dtrain's model contract)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dtrain.config import Config, ConfigError, FPSAConfig  # noqa: E402
from dtrain.data import TaskSpec  # noqa: E402
from dtrain.hf import BertFixedPointAttention, HFBert, attention_mask_parts, fpsa_layers, swap_attention  # noqa: E402
from dtrain.metrics import FPSA_ITERS_MEAN, FPSA_LOOP_LAYER  # noqa: E402
from dtrain.model import build_model  # noqa: E402

VOCAB, LENGTH, BATCH = 40, 10, 3
ONE_STEP = FPSAConfig(max_iter=1, damping=1.0)


def bert_config(impl: str = "eager", **kw) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=impl,
        **kw,
    )


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids, mask


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_swap_keeps_parameter_names_shapes_and_state_dict_keys(cls: str) -> None:
    torch.manual_seed(0)
    model = getattr(transformers, cls)(bert_config())
    names, keys = shapes(model), list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert swap_attention(model, FPSAConfig()) is model
    assert shapes(model) == names and list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors: an optimizer keeps working
    swapped = [m for m in model.modules() if isinstance(m, BertFixedPointAttention)]
    assert len(swapped) == 2 and fpsa_layers(model) == swapped
    assert not any(isinstance(m, transformers.models.bert.modeling_bert.BertAttention) for m in model.modules())
    # a checkpoint of the original class loads into the swapped model, strictly
    fresh = getattr(transformers, cls)(bert_config())
    model.load_state_dict(fresh.state_dict(), strict=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_one_undamped_iteration_reproduces_bert(cls: str, impl: str, padded: bool) -> None:
    torch.manual_seed(0)
    model = getattr(transformers, cls)(bert_config(impl)).eval()
    ids, mask = inputs()
    kwargs = {"attention_mask": mask} if padded else {}

    def out() -> torch.Tensor:
        with torch.no_grad():
            result = model(ids, **kwargs)
        return result.logits if cls == "BertForMaskedLM" else result.last_hidden_state

    want = out()
    swap_attention(model, ONE_STEP)
    got = out()
    real = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
    # real tokens: BERT's output; padded ones never iterate (their output is not used by any real token)
    assert (got - want)[real].abs().max().item() < 1e-6
    if not padded:
        assert (got - want).abs().max().item() < 1e-6


def test_one_iteration_with_grad_enabled_has_bert_values_and_more_iterations_change_them() -> None:
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config()).train()
    ids, mask = inputs()
    want = model(ids, attention_mask=mask).logits.detach()
    swap_attention(model, ONE_STEP)
    got = model(ids, attention_mask=mask).logits  # implicit mode: value Z*, one differentiable step
    real = mask.bool()
    assert (got.detach() - want)[real].abs().max().item() < 1e-6
    # re-configures the swapped blocks; the plain damped loop, whose 8 iterations are still (1/2)^8 of U short of
    # the fixed point (Anderson reaches it, and at initialisation it lies within 2e-7 of one step)
    swap_attention(model, FPSAConfig(max_iter=8, damping=0.5, tol=1e-8, anderson_memory=0))
    assert {layer.cfg.max_iter for layer in fpsa_layers(model)} == {8}
    deeper = model(ids, attention_mask=mask).logits.detach()
    assert all(layer.last_solve.iters > 1 for layer in fpsa_layers(model))
    # (at BERT's initialisation, std 0.02, attention is nearly uniform: iterating moves the logits only a little)
    assert (deeper - want)[real].abs().max().item() > 5e-6


@pytest.mark.parametrize("backward", ["implicit", "phantom", "bptt"])
def test_gradient_flows_to_every_parameter(backward: str) -> None:
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config()).train()
    swap_attention(model, FPSAConfig(max_iter=6, tol=1e-4, backward=backward))
    ids, mask = inputs()
    labels = torch.where(mask.bool(), ids, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    layer = model.bert.encoder.layer[0].attention
    for proj in (layer.self.query, layer.self.key, layer.self.value, layer.output.dense):
        assert proj.weight.grad.abs().sum() > 0
    assert layer.last_solve is not None and int(layer.last_solve.token_iters[~mask.bool()].max()) == 0


def test_mask_forms_agree() -> None:
    x = torch.zeros(2, 4, 8)
    key = torch.tensor([[True, True, True, False], [True, False, False, False]])
    boolean = key[:, None, None, :].expand(2, 1, 4, 4)
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~boolean, torch.finfo(torch.float32).min)
    for mask in (boolean, additive, key.long()):
        real, bias = attention_mask_parts(mask, x)
        assert torch.equal(real, key)
        assert torch.equal(bias.expand(2, 1, 4, 4) < -1e30, ~boolean)
    real, bias = attention_mask_parts(None, x)
    assert real.all() and real.shape == (2, 4) and bias is None


def test_refusals() -> None:
    model = transformers.BertModel(bert_config())
    with pytest.raises(ValueError, match="spectral_norm"):
        swap_attention(model, FPSAConfig(spectral_norm=True))
    with pytest.raises(ValueError, match="no BertAttention"):
        swap_attention(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- model.family=hf-bert

PER_TOKEN = TaskSpec("t", vocab_size=7, seq_len=LENGTH, num_classes=5, per_token=True, targets_per_example=10, pad_id=0)
MLM = TaskSpec("m", vocab_size=7, seq_len=LENGTH, num_classes=7, per_token=True, targets_per_example=10, pad_id=None)
PER_SEQ = TaskSpec("s", vocab_size=7, seq_len=LENGTH, num_classes=3, per_token=False, targets_per_example=1, pad_id=0)


def family_config(attention: str = "fpsa", **fpsa) -> Config:
    model = {"family": "hf-bert", "attention": attention, "d_model": 16, "n_layers": 2, "n_heads": 2}
    return Config.model_validate({"model": model, "fpsa": fpsa})


def tokens_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, 7, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[0, 7:] = False
    return tokens.masked_fill(~mask, 0), mask


@pytest.mark.parametrize(
    ("spec", "shape", "head"),
    [
        (PER_TOKEN, (BATCH, LENGTH, 5), "classifier"),
        (MLM, (BATCH, LENGTH, 7), "cls"),
        (PER_SEQ, (BATCH, 3), "classifier"),
    ],
    ids=["per-token", "masked-lm", "per-sequence"],
)
@pytest.mark.parametrize("attention", ["vanilla", "fpsa"])
def test_hf_bert_family_follows_the_model_contract(spec: TaskSpec, shape: tuple, head: str, attention: str) -> None:
    torch.manual_seed(0)
    model = build_model(family_config(attention, max_iter=4), spec)
    assert isinstance(model, HFBert) and hasattr(model, head)
    tokens, mask = tokens_and_mask()
    logits = model(tokens, mask)
    assert logits.shape == shape
    assert model(tokens, None).shape == shape
    bert = model.bert.config
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads) == (16, 2, 2)
    assert bert.intermediate_size == 64 and bert.max_position_embeddings == LENGTH
    assert bert.attention_probs_dropout_prob == 0.0
    model(tokens, mask).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "token_type" not in n)
    stats, iters = model.step_statistics(), model.example_iterations()
    token_iters = model.token_iterations()
    if attention == "vanilla":
        assert stats == {} and iters is None and token_iters is None
    else:
        assert FPSA_ITERS_MEAN in stats and FPSA_LOOP_LAYER.format(layer=1) in stats
        assert iters.shape == (BATCH,) and (iters >= 1).all()
        assert token_iters.shape == (BATCH, LENGTH) and (token_iters[mask.bool()] >= 1).all()
        assert token_iters.dtype == torch.float64 and (token_iters[~mask.bool()] == 0).all()  # padding: none


def test_hf_bert_masked_lm_keys_are_bert_for_masked_lm_keys() -> None:
    model = build_model(family_config("fpsa"), MLM)
    reference = transformers.BertForMaskedLM(model.bert.config)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_hf_bert_refuses_what_would_change_its_parameters() -> None:
    with pytest.raises(ConfigError, match="learned_temperature"):
        build_model(Config.model_validate({"model": {"family": "hf-bert", "learned_temperature": True}}), PER_SEQ)
    with pytest.raises(ConfigError, match="spectral_norm"):
        build_model(family_config("fpsa", spectral_norm=True), PER_SEQ)


def test_hf_bert_without_transformers_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"model.family=hf-bert needs transformers: pip install 'dtrain\[hf\]'"):
        build_model(family_config(), PER_SEQ)

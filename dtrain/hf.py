"""Hugging Face BERT in dtrain: FPSA swapped into BERT's self-attention, and the `model.family: hf-bert` model.

`swap_attention(model, fpsa_cfg)` replaces every self-attention block (`BertAttention`) of a `transformers` BERT
model (BertModel, BertForMaskedLM, BertForSequenceClassification, ...) by `BertFixedPointAttention`: fixed-point
self-attention (FPSA, dtrain/model/fpsa.py) with the SAME parameters. With X the block's input,

    Z_0 = X,   Z_{k+1} = (1 - α) Z_k + α (X + W_O · concat_h softmax(Q_h(Z_k) K_h(Z_k)ᵀ / √d_h + mask) V_h(X))
    out = LayerNorm(dropout(Z* - X) + X)                      (BERT's post-LN residual, BertSelfOutput)

where W_Q, W_K, W_V are the block's `self.query`, `self.key`, `self.value` and W_O its `output.dense`. One
undamped iteration (fpsa.max_iter=1, fpsa.damping=1) is exactly BERT's attention (to float rounding). The new
module keeps the original `self` (BertSelfAttention) and `output` (BertSelfOutput) submodules, so every parameter
keeps its name, shape and identity: state_dict keys are unchanged (a pretrained checkpoint loads before or after
the swap) and an optimizer built before the swap still holds the right tensors.

The loop is dtrain's own (`FixedPointLoop`: solver, implicit / phantom / bptt backward, exit schedules, the
gradient-capture rule of dAD: differentiable uses of the four projections are module calls, the no-grad solve and
the adjoint's products are F.linear on detached weights).

What differs from BERT's attention, on purpose:

- no attention dropout (`attention_probs_dropout_prob` is ignored): dropout inside the fixed-point map would draw
  a new mask at every iteration, so the map would be random and have no fixed point. BERT's hidden dropout on the
  block's output (`output.dropout`) stays, outside the loop;
- padded tokens never iterate (a padded position's block output is LayerNorm(X), not attention of it; padded keys
  are masked everywhere, so no real token sees the difference);
- no KV cache and no attention probabilities in the outputs (`output_attentions` returns nothing for these
  blocks); cross-attention blocks of a decoder are left as they are.

The attention mask is the one BertModel hands its layers (transformers 5.x): None (no padding), a boolean
[B, 1, Lq, Lk] mask (True = attend; sdpa), an additive float [B, 1, Lq, Lk] mask (eager), or a 2D [B, L] padding
mask (flash attention). A key that no query may attend to is padding.

`build_hf_bert(cfg, spec)` is `dtrain train`'s `model.family: hf-bert` (see `HFBert`).

Written against and tested with transformers 5.x (BertAttention's call and mask conventions of 5.x).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtrain.config import Config, ConfigError, FPSAConfig
from dtrain.data import TaskSpec
from dtrain.model.attention import key_padding_bias
from dtrain.model.fpsa import FixedPointLoop
from dtrain.model.transformer import SelfTransformer

INSTALL_HINT = "pip install 'dtrain[hf]'"
#: an additive mask value at or below this removes a key (transformers 5.x writes finfo(dtype).min, 4.x -10000)
MASKED = -1.0e4
#: dtrain's projection names -> BertSelfAttention's
_BERT_PROJECTIONS = {"q": "query", "k": "key", "v": "value"}


def _bert_module() -> Any:
    """transformers.models.bert.modeling_bert, or a one-line error naming the extra."""
    try:
        from transformers.models.bert import modeling_bert
    except ModuleNotFoundError as err:
        raise ConfigError(f"the Hugging Face models need transformers: {INSTALL_HINT}") from err
    return modeling_bert


def attention_mask_parts(mask: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(real, bias) for FPSA from the mask HF passes its attention layers: real bool [B, L] (the tokens some query
    may attend to: padding is the rest), bias the additive attention bias ([B, 1, Lq, Lk] or [B, 1, 1, L]) or
    None."""
    batch, length = x.shape[:2]
    if mask is None:
        return torch.ones((batch, length), dtype=torch.bool, device=x.device), None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"FPSA: attention mask of type {type(mask).__name__} is not supported; build the model with "
            "attn_implementation='eager' or 'sdpa'"
        )
    if mask.dim() == 2:  # flash attention: the padding mask itself, nonzero = real
        real = mask.to(device=x.device, dtype=torch.bool)
        return real, key_padding_bias(real, x.dtype)
    if mask.dim() != 4:
        raise ValueError(f"FPSA: expected a 2D or 4D attention mask, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
    else:
        allowed = mask > MASKED
        bias = mask.to(x.dtype)
    real = allowed.any(dim=1).any(dim=1)  # [B or 1, Lk]: keys some query of some head may attend to
    return real.expand(batch, length), bias


class BertFixedPointAttention(FixedPointLoop):
    """FPSA in place of a `BertAttention` block, on its own parameters (see the module docstring).

    Children: `self` (the original BertSelfAttention: query, key, value) and `output` (the original
    BertSelfOutput: dense, LayerNorm, dropout), as in BertAttention. Called like BertAttention; returns
    (block output, None)."""

    def __init__(self, attention: nn.Module, cfg: FPSAConfig) -> None:
        super().__init__(attention.self.num_attention_heads, cfg)
        self.self = attention.self
        self.output = attention.output
        self.is_cross_attention = False
        self._init_spectral()

    def projection(self, name: str) -> nn.Linear:
        return self.output.dense if name == "o" else getattr(self.self, _BERT_PROJECTIONS[name])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("FPSA keeps no KV cache: call the model with use_cache=False")
        real, bias = attention_mask_parts(attention_mask, hidden_states)
        update = self.fixed_point(hidden_states, real, bias)
        out = self.output
        return out.LayerNorm(out.dropout(update) + hidden_states), None


def swap_attention(model: nn.Module, fpsa_cfg: FPSAConfig | dict[str, Any] | None = None) -> nn.Module:
    """Replace every BERT self-attention block of `model` by FPSA on the same parameters; returns `model`
    (changed in place). `fpsa_cfg`: an FPSAConfig, a dict of its keys, or None for its defaults.

    Blocks swapped before take the new configuration (a second call re-configures, it does not nest);
    cross-attention blocks are kept. fpsa.spectral_norm is refused: its power-iteration vectors would be new
    state_dict entries."""
    cfg = FPSAConfig.model_validate(fpsa_cfg) if isinstance(fpsa_cfg, dict) else fpsa_cfg or FPSAConfig()
    if cfg.spectral_norm:
        raise ValueError("swap_attention: fpsa.spectral_norm is not supported (it would add state_dict entries)")
    bert = _bert_module()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, bert.BertAttention) and not getattr(module, "is_cross_attention", False)
    ]
    swapped = [m for m in model.modules() if isinstance(m, BertFixedPointAttention)]
    if not targets and not swapped:
        raise ValueError(f"swap_attention: {type(model).__name__} has no BertAttention self-attention block")
    for module in swapped:
        module.cfg = cfg
    for name, module in targets:
        if not name:
            raise ValueError("swap_attention: pass the model that holds the BertAttention block, not the block")
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, BertFixedPointAttention(module, cfg))
    return model


def fpsa_layers(model: nn.Module) -> list[FixedPointLoop]:
    """The FPSA layers of `model`, in module order (each holds `last_solve` and `last_adjoint` of its last
    forward and backward)."""
    return [m for m in model.modules() if isinstance(m, FixedPointLoop)]


# ---------------------------------------------------------------------------------------------- model.family=hf-bert


class HFBert(nn.Module):
    """`model.family: hf-bert`: a Hugging Face BERT of cfg.model's sizes, under dtrain's model contract.

        logits = model(tokens, mask)     # [B, L, C] per-token, [B, C] per-sequence; mask bool [B, L] or None

    Sizes: d_model -> hidden_size, n_layers, n_heads, d_ff -> intermediate_size (default 4 d_model), dropout ->
    hidden_dropout_prob (attention dropout 0, as in dtrain's own model), max_position_embeddings = spec.seq_len,
    one token type, spec.pad_id as pad_token_id. Eager attention (the reference implementation).

    Heads, named as in transformers so the state dict matches the HF class of the same head:
    - per-token with num_classes == vocab_size: BertForMaskedLM's `cls` (transform + decoder tied to the word
      embeddings); keys are BertForMaskedLM's;
    - other per-token tasks: dropout + Linear `classifier` on every token (as BertForTokenClassification);
    - per-sequence: dropout + Linear `classifier` on the mean of the real tokens' final states (dtrain's tasks
      have no [CLS] token, so no pooler).

    With model.attention=fpsa the self-attention blocks are FPSA (`swap_attention` with cfg.fpsa), and the
    model reports its solver figures like the SELF-Transformer (dtrain.metrics.ReportsStatistics)."""

    def __init__(self, cfg: Config, spec: TaskSpec) -> None:
        super().__init__()
        m = cfg.model
        if m.learned_temperature:
            raise ConfigError("model.learned_temperature=true is not supported with model.family=hf-bert")
        if m.attention == "fpsa" and cfg.fpsa.spectral_norm:
            raise ConfigError("fpsa.spectral_norm=true is not supported with model.family=hf-bert")
        try:
            import transformers
        except ModuleNotFoundError as err:
            raise ConfigError(f"model.family=hf-bert needs transformers: {INSTALL_HINT}") from err
        self.spec = spec
        config = transformers.BertConfig(
            vocab_size=spec.vocab_size,
            hidden_size=m.d_model,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            intermediate_size=m.d_ff if m.d_ff is not None else 4 * m.d_model,
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=spec.seq_len,
            type_vocab_size=1,
            pad_token_id=spec.pad_id,
            attn_implementation="eager",
        )
        self.masked_lm = spec.per_token and spec.num_classes == spec.vocab_size
        if self.masked_lm:
            mlm = transformers.BertForMaskedLM(config)  # its decoder weight IS the word embedding (tied)
            self.bert, self.cls = mlm.bert, mlm.cls
        else:
            self.bert = transformers.BertModel(config, add_pooling_layer=False)
            self.dropout = nn.Dropout(m.dropout)
            self.classifier = nn.Linear(m.d_model, spec.num_classes)
            nn.init.normal_(self.classifier.weight, std=config.initializer_range)  # BERT's initialisation
            nn.init.zeros_(self.classifier.bias)
        if m.attention == "fpsa":
            swap_attention(self.bert, cfg.fpsa)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.masked_lm:
            return self.cls(h)
        if self.spec.per_token:
            return self.classifier(self.dropout(h))
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            weights = mask.to(h.dtype)[..., None]
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))

    # dtrain.metrics.ReportsStatistics, and the FPSA figures: the SELF-Transformer's own methods (one
    # implementation), over this model's FPSA layers
    step_statistics = SelfTransformer.step_statistics
    example_iterations = SelfTransformer.example_iterations
    token_iterations = SelfTransformer.token_iterations
    fpsa_stats = SelfTransformer.fpsa_stats
    fpsa_example_iters = SelfTransformer.fpsa_example_iters
    regularisation_loss = SelfTransformer.regularisation_loss

    def fpsa_layers(self) -> list[FixedPointLoop]:
        return fpsa_layers(self)


def build_hf_bert(cfg: Config, spec: TaskSpec) -> HFBert:
    return HFBert(cfg, spec)

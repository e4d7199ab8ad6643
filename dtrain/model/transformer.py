"""The pre-LN encoder used for every task, with vanilla or fixed-point self-attention.

    h = token_embedding + position_embedding       (learned, or sinusoidal: model.positions)
    per block:  h = h + drop(attn(LN(h), mask));  h = h + drop(FFN(LN(h)))      FFN = Linear -> GELU -> Linear
    logits = head(LN(h))                 per-token tasks:    [B, L, C]
    logits = head(masked_mean(LN(h)))    per-sequence tasks: [B, C]

Dropout (model.dropout) is applied to the embeddings and to each sublayer's output, never inside attention, so
the FPSA map stays deterministic across iterations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dtrain import metrics
from dtrain.config import Config
from dtrain.data import TaskSpec

from .attention import VanillaAttention
from .fpsa import FixedPointAttention


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """[L, d_model] fixed position embeddings of Vaswani et al. 2017: sin on the even and cos on the odd
    features, wavelengths 2π .. 10000·2π."""
    freqs = torch.exp(torch.arange(0, d_model, 2, device=positions.device) * (-math.log(10000.0) / d_model))
    angles = positions.float()[:, None] * freqs[None, :]
    table = torch.zeros(len(positions), d_model, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, attn: nn.Module, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = attn
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.drop(self.attn(self.ln_attn(h), mask))
        return h + self.drop(self.ff(self.ln_ff(h)))


class SelfTransformer(nn.Module):
    def __init__(self, cfg: Config, spec: TaskSpec) -> None:
        super().__init__()
        m = cfg.model
        if m.learned_temperature and m.attention != "fpsa":
            raise ValueError("model.learned_temperature=true needs model.attention=fpsa (it is an FPSA parameter)")
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, m.d_model)
        # model.positions=sinusoidal: no table, so the model runs at any length (sinusoidal_positions)
        self.pos = nn.Embedding(spec.seq_len, m.d_model) if m.positions == "learned" else None
        self.drop = nn.Dropout(m.dropout)

        def attention() -> nn.Module:
            if m.attention == "fpsa":
                return FixedPointAttention(m.d_model, m.n_heads, cfg.fpsa, m.learned_temperature)
            return VanillaAttention(m.d_model, m.n_heads)

        d_ff = m.d_ff if m.d_ff is not None else 4 * m.d_model
        self.blocks = nn.ModuleList(Block(attention(), m.d_model, d_ff, m.dropout) for _ in range(m.n_layers))
        self.norm = nn.LayerNorm(m.d_model)
        self.head = nn.Linear(m.d_model, spec.num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        pos = self.pos(positions) if self.pos is not None else sinusoidal_positions(positions, self.embed.embedding_dim)
        h = self.drop(self.embed(tokens) + pos.to(self.embed.weight.dtype))
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        if self.spec.per_token:
            return self.head(h)
        if mask is None:
            return self.head(h.mean(dim=1))
        weights = mask.to(h.dtype)[..., None]
        return self.head((h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0))

    # ------------------------------------------------------------------------------------------ statistics
    # dtrain.metrics.ReportsStatistics: what the trainer logs about the model, without knowing it is FPSA

    def step_statistics(self) -> dict[str, float]:
        """The FPSA solver figures of the last forward (`fpsa_stats`); {} for vanilla attention."""
        return self.fpsa_stats()

    def example_iterations(self) -> torch.Tensor | None:
        """float [B]: FPSA iterations each example of the last forward needed, as the mean over layers; None
        for vanilla attention, whose computation does not adapt."""
        layers = self.fpsa_layers()
        if not layers:
            return None
        return self.fpsa_example_iters().float() / len(layers)

    def token_iterations(self) -> torch.Tensor | None:
        """float64 [B, L] on the device: FPSA iterations each token of the last forward was updated in, as the
        mean over layers (0 for padding); None for vanilla attention. No host sync."""
        solves = [layer.last_solve for layer in self.fpsa_layers()]
        if not solves or any(s is None for s in solves):
            return None
        return torch.stack([s.token_iters for s in solves]).sum(dim=0).double() / len(solves)

    def regularisation_loss(self) -> torch.Tensor | None:
        """fpsa.jac_reg x the sum over FPSA layers of their Jacobian penalty of the last training forward, to add
        to the loss before backward; None when there is none (vanilla, jac_reg 0, evaluation)."""
        terms = [(layer.cfg.jac_reg, layer.jac_penalty) for layer in self.fpsa_layers()]
        terms = [weight * penalty for weight, penalty in terms if penalty is not None]
        return torch.stack(terms).sum() if terms else None

    # ------------------------------------------------------------------------------------------ FPSA stats

    def fpsa_layers(self) -> list[FixedPointAttention]:
        return [b.attn for b in self.blocks if isinstance(b.attn, FixedPointAttention)]

    def fpsa_stats(self) -> dict[str, float]:
        """Solver figures of the last forward ({} for vanilla attention).

        fpsa/iters_l{i}: mean iterations per real token in layer i; fpsa/iters_mean: their mean over layers;
        fpsa/loop_l{i}: iterations layer i's loop ran (its slowest token); fpsa/converged_frac: share of
        (real token, layer) pairs that met fpsa.tol. After an implicit backward also fpsa/adj_iters_l{i},
        fpsa/adj_residual_l{i} (the worst relative residual of the adjoint system over examples) and
        fpsa/adj_fallback_l{i} (examples that fell back to the phantom gradient) of the last adjoint solve; with
        fpsa.jac_reg, fpsa/jac_penalty (the layers' mean Jacobian penalty). One host sync reads them all.
        """
        layers = self.fpsa_layers()
        solves = [layer.last_solve for layer in layers]
        if not layers or any(s is None for s in solves):
            return {}
        # every figure is a device value: gather them into one tensor and read it with one host sync
        parts = []
        for layer, s in zip(layers, solves):
            parts += [s.device_sums(), s.loop_iters().double()[None]]
            if layer.last_adjoint.ran:
                parts.append(layer.last_adjoint.values)
        penalties = [layer.jac_penalty for layer in layers if layer.jac_penalty is not None]
        if penalties:
            parts.append(torch.stack(penalties).detach().double().mean()[None])
        values = torch.cat([p.to(parts[0].device) for p in parts]).tolist()
        stats: dict[str, float] = {}
        fractions = []
        for i, layer in enumerate(layers):
            token_iters, converged, real, loop, *values = values
            # the mean over real tokens (sums of integers are exact in float64: the same value as a mean)
            stats[metrics.FPSA_ITERS_LAYER.format(layer=i)] = token_iters / real if real else math.nan
            stats[metrics.FPSA_LOOP_LAYER.format(layer=i)] = loop
            fractions.append(converged / real if real else math.nan)
            if layer.last_adjoint.ran:
                (iters, residual, fallbacks), values = values[:3], values[3:]
                if iters:
                    stats[metrics.FPSA_ADJ_ITERS_LAYER.format(layer=i)] = iters
                    stats[metrics.FPSA_ADJ_RESIDUAL_LAYER.format(layer=i)] = residual
                    stats[metrics.FPSA_ADJ_FALLBACK_LAYER.format(layer=i)] = fallbacks
        per_layer = [stats[metrics.FPSA_ITERS_LAYER.format(layer=i)] for i in range(len(layers))]
        stats[metrics.FPSA_ITERS_MEAN] = sum(per_layer) / len(layers)
        stats[metrics.FPSA_CONVERGED_FRAC] = sum(fractions) / len(solves)
        if penalties:
            stats[metrics.FPSA_JAC_PENALTY] = values[0]
        return stats

    def fpsa_example_iters(self, layer: int | None = None) -> torch.Tensor:
        """int64 [B]: iterations each example of the last forward needed (until all its real tokens stopped),
        in FPSA layer `layer`, or summed over layers when None."""
        solves = [attn.last_solve for attn in self.fpsa_layers()]
        if not solves or any(s is None for s in solves):
            raise RuntimeError("fpsa_example_iters: no FPSA forward has run (or attention is vanilla)")
        if layer is not None:
            return solves[layer].example_iters()
        return torch.stack([s.example_iters() for s in solves]).sum(dim=0)


def regularisation_loss(model: nn.Module) -> torch.Tensor | None:
    """The model's regularisation term of its last training forward (to add to the loss), None without one."""
    regulariser = getattr(model, "regularisation_loss", None)
    return regulariser() if regulariser is not None else None


def build_model(cfg: Config, spec: TaskSpec) -> nn.Module:
    """The SELF-Transformer, or with model.family=hf-bert a Hugging Face BERT of the same sizes (dtrain.hf)."""
    if cfg.model.family == "hf-bert":
        from dtrain.hf import build_hf_bert  # lazy: transformers is the optional extra dtrain[hf]

        return build_hf_bert(cfg, spec)
    return SelfTransformer(cfg, spec)

"""SELF-Transformer (see dtrain/model/transformer.py and fpsa.py). Contract used by the trainer:

    model = build_model(cfg, task.spec)         # cfg: dtrain.config.Config
    logits = model(tokens, mask)                # [B, C] per-sequence, [B, L, C] per-token
    model.step_statistics()                     # {'fpsa/iters_mean': .., 'fpsa/iters_l0': .., ...} of the last forward
    model.example_iterations()                  # float [B] FPSA iterations per example (mean over layers), or None
    model.token_iterations()                    # float64 [B, L] FPSA iterations per token (mean over layers), or None
    regularisation_loss(model)                  # a term for the loss (fpsa.jac_reg), or None

step_statistics and example_iterations are dtrain.metrics.ReportsStatistics, token_iterations
dtrain.metrics.ReportsTokenIterations: the trainer logs them without knowing about FPSA.

With model.family=hf-bert, build_model returns dtrain.hf.HFBert (a Hugging Face BERT) under the same contract.
"""

from .attention import VanillaAttention
from .fpsa import FixedPointAttention
from .transformer import SelfTransformer, build_model, regularisation_loss

__all__ = ["FixedPointAttention", "SelfTransformer", "VanillaAttention", "build_model", "regularisation_loss"]

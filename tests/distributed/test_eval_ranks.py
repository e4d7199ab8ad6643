"""The evaluation on real gloo ranks: each rank evaluates its share of the held-out split, and the reduced
figures (loss, accuracy, iterations by example and by token difficulty, the token slope) are the single
process's, on every rank."""

from __future__ import annotations

import pytest
import torch

from dtrain.config import Config
from dtrain.data import build_task
from dtrain.distributed import DistEnv
from dtrain.model import build_model
from dtrain.trainer import EvalResult, evaluate


def _evaluate(rank: int, world: int, n_val: int) -> EvalResult:
    cfg = Config.model_validate(
        {
            "model": {"d_model": 8, "n_layers": 2, "n_heads": 2},
            "fpsa": {"max_iter": 12, "tol": 1e-4, "damping": 1.0},
            "data": {"task": "s5", "seq_len": 10, "n_val": n_val},
            "eval": {"batch_size": 8},
        }
    )
    torch.manual_seed(0)
    task = build_task(cfg.data)
    model = build_model(cfg, task.spec)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    return evaluate(model, task, cfg, env)


@pytest.mark.parametrize(("world", "n_val"), [(2, 29), (3, 2)], ids=["uneven-world2", "idle-rank-world3"])
def test_every_rank_reports_the_single_process_figures(world: int, n_val: int):
    from tests.helpers.ranks import run_ranks

    alone = _evaluate(0, 1, n_val)
    assert alone.iters_by_token_difficulty and alone.iters_by_difficulty
    for rank, res in enumerate(run_ranks(_evaluate, world, n_val)):
        # float32 loss sums over other batches: equal to rounding
        assert (res.loss, res.acc) == pytest.approx((alone.loss, alone.acc), rel=1e-6), rank
        assert res.iters_by_difficulty == alone.iters_by_difficulty, rank
        assert res.acc_by_difficulty == alone.acc_by_difficulty, rank
        assert res.iters_by_token_difficulty == pytest.approx(alone.iters_by_token_difficulty, rel=1e-12), rank
        # NaN with two examples of S5 here: every token at difficulty 0
        assert res.token_iters_slope == pytest.approx(alone.token_iters_slope, rel=1e-9, nan_ok=True), rank

"""The CLI's contract in this process: typed --set overrides, refusals at load time, launcher flags."""

from __future__ import annotations

import pytest

from dtrain.cli import _pop_local_rank
from dtrain.config import ConfigError, load_config
from tests.helpers.launch import ROOT

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_overrides_are_typed_and_nested():
    cfg = load_config(QUICKSTART, ["train.steps=7", "comm.strategy=dad", "fpsa.tol=1e-5", "log.progress=false"])
    assert (cfg.train.steps, cfg.comm.strategy, cfg.fpsa.tol, cfg.log.progress) == (7, "dad", 1e-5, False)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(QUICKSTART, ["train.steps"])


def test_zero3_with_custom_strategy_is_rejected_with_reason():
    with pytest.raises(ConfigError, match="ZeRO-2/3.*custom strategy"):
        load_config(QUICKSTART, ["train.engine=deepspeed", "train.zero_stage=3", "comm.strategy=rankdad"])


@pytest.mark.parametrize(
    "argv, rest, rank",
    [
        (["--local_rank=1", "train", "--config", "x"], ["train", "--config", "x"], 1),
        (["train", "--local-rank", "3", "--config", "x"], ["train", "--config", "x"], 3),
        (["train", "--config", "x"], ["train", "--config", "x"], None),
    ],
)
def test_launcher_local_rank_flags_are_accepted(argv, rest, rank):
    assert _pop_local_rank(argv) == (rest, rank)

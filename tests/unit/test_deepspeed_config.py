"""The DeepSpeed config dtrain generates from its own config, and the user JSON it merges or refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.launch import TINY


def _cfg(*overrides: str):
    from dtrain.config import load_config

    return load_config(TINY, list(overrides))


def test_ds_config_is_generated_from_our_config():
    from dtrain.engine.deepspeed_engine import build_ds_config

    ds = build_ds_config(_cfg("train.engine=deepspeed", "train.batch_size=8", "train.comms_logger=true"), 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        8,
        2,
        1,
    )
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 0}
    assert ds["comms_logger"]["enabled"] is True
    # ZeRO-1: no gradient bucket (DeepSpeed's reduction never runs) and no norm all-reduce (DeepSpeed doesn't clip)
    ds = build_ds_config(_cfg("train.engine=deepspeed", "train.zero_stage=1"), 2)
    assert ds["zero_optimization"] == {"stage": 1, "contiguous_gradients": False, "compute_grad_norm": False}


def test_ds_config_merges_a_user_json(tmp_path: Path):
    from dtrain.engine.deepspeed_engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"wall_clock_breakdown": True, "comms_logger": {"verbose": True}, "train_micro_batch_size_per_gpu": 4}
        )
    )
    ds = build_ds_config(_cfg("train.engine=deepspeed", f"train.deepspeed_config={user}"), 2)
    assert ds["wall_clock_breakdown"] is True
    assert ds["comms_logger"] == {"enabled": False, "verbose": True, "prof_all": True}
    assert ds["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train_batch_size": 16}, "inconsistent batch sizes"),
        ({"train_micro_batch_size_per_gpu": 2}, "inconsistent batch sizes"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 is not supported"),
        ({"gradient_clipping": 1.0}, "must be 0"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer' is not supported"),
        ({"bf16": {"enabled": True}}, "bf16 is not supported"),
        ({"zero_optimization": {"stage": 1}}, "differs from train.zero_stage=0"),
        ({"zero_optimization": {"overlap_comm": True}}, "overlap_comm=true is not supported"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer is not supported"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_ds_config_refuses_what_would_bypass_the_trainer(tmp_path: Path, content, message):
    from dtrain.config import ConfigError
    from dtrain.engine.deepspeed_engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message) as err:
        build_ds_config(_cfg("train.engine=deepspeed", f"train.deepspeed_config={user}"), 2)
    assert "\n" not in str(err.value)


def test_ds_config_missing_file_is_one_line():
    from dtrain.config import ConfigError
    from dtrain.engine.deepspeed_engine import build_ds_config

    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(_cfg("train.engine=deepspeed", "train.deepspeed_config=/nonexistent/ds.json"), 1)

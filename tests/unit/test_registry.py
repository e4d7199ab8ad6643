"""The strategy registry: the one list of names that config, CLI and build_strategy read, and each strategy's
typed options."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dtrain.compression import build_strategy
from dtrain.compression.registry import EXACT_STRATEGIES, STRATEGIES, STRATEGY_NAMES, help_text
from dtrain.config import CommConfig, ConfigError, config_from_dict

# the keys that are not a strategy's option: which strategy, and the job-wide collective timeout
_NOT_OPTIONS = {"strategy", "timeout_s"}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_registered_strategy_builds_under_its_name(name):
    strategy = build_strategy(CommConfig(strategy=name))
    assert strategy.name == name
    assert f"  {name} " in help_text()


def test_the_config_accepts_exactly_the_registered_names():
    for name in STRATEGY_NAMES:
        assert config_from_dict({"comm": {"strategy": name}}).comm.strategy == name
    with pytest.raises(ConfigError, match="comm.strategy: 'topk' is not allowed; allowed: 'allreduce'"):
        config_from_dict({"comm": {"strategy": "topk"}})
    assert EXACT_STRATEGIES == ("allreduce", "ddp", "dad")


def test_every_comm_key_is_an_option_of_some_strategy_and_every_option_a_comm_key():
    used = {key for spec in STRATEGIES.values() for key in spec.options}
    assert used == set(CommConfig.model_fields) - _NOT_OPTIONS


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_a_strategy_gets_only_its_own_options_typed_and_frozen(name):
    options = CommConfig(strategy=name, rank=3).options()
    assert set(type(options).model_fields) == set(STRATEGIES[name].options)
    if "rank" in STRATEGIES[name].options:
        assert options.rank == 3
    with pytest.raises(ValidationError):
        options.bucket_mb = 1.0  # frozen: a strategy cannot change its configuration


def test_options_of_other_strategies_still_load_so_old_configs_and_sweeps_keep_working():
    # the quickstart sets comm.rank with allreduce; a sweep sets it for every strategy
    cfg = config_from_dict({"comm": {"strategy": "allreduce", "rank": 2, "power_iters": 3, "rankdad_mode": "twoway"}})
    assert cfg.comm.rank == 2 and not hasattr(cfg.comm.options(), "rank")


@pytest.mark.parametrize(
    "comm, message",
    [
        ({"strategy": "ddp-powersgd", "factor_dtype": "bf16"}, "powerSGD_hook sends fp32 factors only"),
        ({"strategy": "ddp-powersgd", "start_step": 1}, "needs start_step >= 2"),
        ({"strategy": "powersgd", "rest_dtype": "bf16"}, "only dad, rankdad and auto send the uncaptured gradients"),
    ],
)
def test_a_strategy_s_own_rules_give_one_line(comm, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({"comm": comm})
    assert "\n" not in str(err.value)


def test_rest_dtype_is_refused_for_strategies_that_do_not_split_the_rest():
    with pytest.raises(ConfigError, match="rest_dtype"):
        config_from_dict({"comm": {"strategy": "powersgd", "rest_dtype": "bf16"}})


@pytest.mark.parametrize(
    "fields",
    [
        dict(strategy="powersgd", factor_dtype="int8"),
        dict(strategy="rankdad", rankdad_mode="allreduce", factor_dtype="fp8"),
        dict(strategy="rankdad", rankdad_mode="alternating", factor_dtype="int8", rest_dtype="int8"),
        dict(strategy="rankdad", rankdad_mode="twoway", factor_dtype="int8", rest_dtype="fp8"),
        dict(strategy="auto", factor_dtype="int8", rest_dtype="int8"),
    ],
)
def test_8bit_formats_are_taken_wherever_our_strategies_send_factors_or_the_rest(fields):
    options = CommConfig(**fields).options()
    assert options.factor_dtype == fields["factor_dtype"]

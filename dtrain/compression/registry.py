"""The one registry of gradient-communication strategies: names, where each is built, which `comm` options it
reads, and the rules only it imposes on them.

The config (`comm.strategy` and its validation), the CLI help and `build_strategy` all read this table, so a
strategy is named once. Torch-free: the config is validated before torch is imported.

`comm` stays one flat section (every key that ever loaded still loads, whatever the strategy: a sweep sets
`comm.rank` for all of them); each strategy gets its own typed, frozen options object holding only the keys in
`StrategySpec.options`, validated with the strategy's own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model


def _ddp_powersgd_rules(o: Any) -> None:
    if o.factor_dtype != "fp32":
        raise ValueError(
            f"comm.factor_dtype={o.factor_dtype!r} with comm.strategy='ddp-powersgd': torch's "
            "powerSGD_hook sends fp32 factors only; use comm.strategy=powersgd for low-precision factors"
        )
    if o.start_step < 2 and (o.error_feedback or o.warm_start):
        raise ValueError(
            f"comm.start_step={o.start_step} with comm.strategy='ddp-powersgd': torch's PowerSGD "
            "needs start_step >= 2 when error feedback or warm start is on"
        )


def _budget_rule(o: Any) -> None:
    if o.budget_bytes is not None and o.budget_ms is not None:
        raise ValueError("comm.budget_bytes and comm.budget_ms both set: give the budget one way")
    if o.budget_ms is not None and o.link_rate is None:
        raise ValueError(f"comm.budget_ms={o.budget_ms} needs comm.link_rate (e.g. 100mbit) to become bytes")
    if (o.budget_bytes is not None or o.budget_ms is not None) and o.spectrum_every == 0:
        raise ValueError("a rank budget re-plans from the measured spectra: comm.spectrum_every must be > 0")


def _auto_rules(o: Any) -> None:
    if o.rankdad_mode == "alternating":
        raise ValueError(
            "comm.rankdad_mode='alternating' with comm.strategy='auto': auto chooses per layer among all-reduce, "
            "dad and rankdad's oneway/twoway and allreduce forms; use comm.strategy=rankdad for the alternating form"
        )


def _alternating_rule(o: Any) -> None:
    if o.rankdad_mode == "alternating" and (o.power_iters != 1 or not o.warm_start):
        raise ValueError(
            f"comm.rankdad_mode='alternating' with comm.power_iters={o.power_iters} and comm.warm_start="
            f"{o.warm_start}: it does half a power iteration per step from the last step's factor, so it needs "
            "comm.power_iters=1 and comm.warm_start=true"
        )


def _rankdad_rules(o: Any) -> None:
    _budget_rule(o)
    _alternating_rule(o)


@dataclass(frozen=True)
class StrategySpec:
    name: str
    #: "module:Class", imported on demand so that one strategy's imports never slow the others
    target: str
    #: the delivered gradient equals the all-reduce mean (up to float rounding)
    exact: bool
    #: one line for `dtrain train --help`
    summary: str
    #: the `comm` keys this strategy reads (its typed options)
    options: tuple[str, ...]
    #: extra rules on those options; raise ValueError with one line for the user
    rules: Callable[[Any], None] | None = field(default=None, compare=False)


_LOWRANK = ("rank", "error_feedback", "warm_start", "factor_dtype")
_CAPTURE = ("bucket_mb", "rest_dtype", "overlap", "error_feedback")
_RANKDAD = (*_CAPTURE, "rank", "warm_start", "factor_dtype", "power_iters", "rankdad_mode", "spectrum_every")
_BUDGET = ("budget_bytes", "budget_ms", "replan_every", "link_rate")

STRATEGIES: dict[str, StrategySpec] = {
    s.name: s
    for s in (
        StrategySpec(
            "allreduce",
            "dtrain.compression.allreduce:AllReduce",
            True,
            "exact baseline: every gradient, fp32, bucketed ring all-reduce",
            ("bucket_mb",),
        ),
        StrategySpec(
            "ddp",
            "dtrain.compression.ddp:build_ddp",
            True,
            "torch DistributedDataParallel (buckets reduced during backward)",
            ("bucket_mb",),
        ),
        StrategySpec(
            "ddp-powersgd",
            "dtrain.compression.ddp:build_ddp_powersgd",
            False,
            "DDP with torch's PowerSGD comm hook",
            ("bucket_mb", *_LOWRANK, "start_step", "min_compression_rate"),
            _ddp_powersgd_rules,
        ),
        StrategySpec(
            "powersgd",
            "dtrain.compression.powersgd:PowerSGD",
            False,
            "our PowerSGD: rank-r factors all-reduced, error feedback, warm start",
            ("bucket_mb", *_LOWRANK, "start_step", "min_compression_rate"),
        ),
        StrategySpec(
            "dad",
            "dtrain.compression.captured:build_dad",
            True,
            "dAD: Linear layers send their (A, Δ) rows (exact)",
            _CAPTURE,
        ),
        StrategySpec(
            "rankdad",
            "dtrain.compression.captured:build_rankdad",
            False,
            "rank-dAD: Linear layers send k low-rank factors of Δᵀ A",
            (*_RANKDAD, *_BUDGET),
            _rankdad_rules,
        ),
        StrategySpec(
            "auto",
            "dtrain.compression.captured:build_auto",
            False,
            "per Linear layer the cheapest of all-reduce, dad and rankdad's two forms (wire bytes, or time on a link)",
            (*_RANKDAD, "min_compression_rate", "link_rate", "link_latency_us"),
            _auto_rules,
        ),
    )
}

STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
EXACT_STRATEGIES: tuple[str, ...] = tuple(n for n, s in STRATEGIES.items() if s.exact)

#: options that change the result: given to a strategy that ignores them, they are an error, not a no-op.
#: key -> (its neutral value, what the strategies that read it do with it)
_RESULT_CHANGING = {"rest_dtype": ("fp32", "send the uncaptured gradients separately")}

_MODELS: dict[tuple[str, type], type[BaseModel]] = {}


def options_model(name: str, comm_model: type[BaseModel]) -> type[BaseModel]:
    """The typed options class of strategy `name`: its keys, with the types, defaults and ranges that the
    flat `comm` section (`comm_model`) defines for them (each option is defined once, there)."""
    key = (name, comm_model)
    if key not in _MODELS:
        spec = STRATEGIES[name]
        fields = {f: (comm_model.model_fields[f].annotation, comm_model.model_fields[f]) for f in spec.options}
        title = "".join(part.capitalize() for part in name.split("-")) + "Options"
        _MODELS[key] = create_model(title, __config__=ConfigDict(frozen=True, extra="forbid"), **fields)
    return _MODELS[key]


def strategy_options(comm: BaseModel) -> BaseModel:
    """`comm` (the flat section) seen as its strategy's typed options; raises ValueError on a rule it breaks."""
    spec = STRATEGIES[comm.strategy]
    for key, (neutral, purpose) in _RESULT_CHANGING.items():
        if key not in spec.options and getattr(comm, key) != neutral:
            users = [n for n, s in STRATEGIES.items() if key in s.options]
            raise ValueError(
                f"comm.{key}={getattr(comm, key)!r} with comm.strategy={spec.name!r}: only "
                f"{', '.join(users[:-1])} and {users[-1]} {purpose}; use {key}={neutral}"
            )
    options = options_model(spec.name, type(comm))(**{f: getattr(comm, f) for f in spec.options})
    if spec.rules is not None:
        spec.rules(options)
    return options


def help_text() -> str:
    """One line per strategy, for the CLI."""
    width = max(map(len, STRATEGIES))
    return "\n".join(f"  {s.name:<{width}}  {s.summary}" for s in STRATEGIES.values())

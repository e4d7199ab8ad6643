"""The time-to-accuracy model: what a run would take on a link of a given rate.

A run measured on a fast local link tells us how many steps it needs to reach an accuracy, how long a step
computes and how many bytes a step puts on each rank's link. On a slower link the communication part
stretches, the rest does not:

    time to target = steps to target x (compute seconds per step + wire bytes per step / link rate)

Assumptions, stated in every report: communication does not overlap computation, every rank sends its wire
bytes at the same time over its own link of the given rate (so a ring collective's time is one rank's wire
bytes over the rate), and latency is ignored. It is therefore an estimate of the bandwidth-bound regime, not
a measurement; `dtrain sweep` with `link_rates` measures real runs on shaped links instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..metrics import STEP, VAL_ACC

MODEL_DESCRIPTION = (
    "time to target = steps to target × (compute s/step + wire bytes/step ÷ link rate). "
    "Compute s/step is the measured step time minus the measured communication time; wire bytes/step is "
    "what one rank's collectives put on its link (a ring all-reduce sends 2(S−1)/S × payload). "
    "The model assumes communication does not overlap computation, all ranks send at once over their own "
    "link of the given rate, and ignores latency: it estimates the bandwidth-bound regime."
)

# tc(8) spelling, as launch/netns_cluster takes them: bits per second with decimal (SI) multipliers.
_BIT_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class LinkRate:
    label: str
    bits_per_s: float

    @property
    def bytes_per_s(self) -> float:
        return self.bits_per_s / 8.0


def parse_link_rate(text: str) -> LinkRate:
    """'100mbit' -> LinkRate('100mbit', 1e8)."""
    match = _RATE.match(text.lower())
    if not match or match.group(2) not in _BIT_UNITS:
        raise ConfigError(
            f"link rate {text!r}: expected a number and a unit, one of {', '.join(_BIT_UNITS)} (e.g. 100mbit)"
        )
    bits = float(match.group(1)) * _BIT_UNITS[match.group(2)]
    if bits <= 0:
        raise ConfigError(f"link rate {text!r}: must be positive")
    return LinkRate(text.strip().lower(), bits)


def parse_link_rates(items: Iterable[str]) -> list[LinkRate]:
    rates = [parse_link_rate(item) for item in items if item.strip()]
    if not rates:
        raise ConfigError("no link rates given (e.g. 10mbit,100mbit,1gbit)")
    return rates


def steps_to_target(eval_rows: Iterable[dict[str, Any]], target_acc: float) -> int | None:
    """The first evaluated step whose validation accuracy reaches the target; None if none does."""
    for row in sorted(eval_rows, key=lambda r: r[STEP]):
        if row[VAL_ACC] >= target_acc:
            return int(row[STEP])
    return None


def time_to_target(steps: float, compute_s_per_step: float, wire_bytes_per_step: float, rate: LinkRate) -> float:
    return steps * (compute_s_per_step + wire_bytes_per_step / rate.bytes_per_s)

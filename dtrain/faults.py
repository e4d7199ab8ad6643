"""Fault injection for the reliability suite (tests/distributed/test_faults.py), driven by one environment variable.

    DTRAIN_FAULT="kill@train:step=5,rank=1"         SIGKILL this rank after its step-5 update
    DTRAIN_FAULT="kill@checkpoint:step=4,rank=0"    SIGKILL while writing the step-4 checkpoint
    DTRAIN_FAULT="nan@loss:step=3,rank=1"           this rank's loss becomes NaN at step 3
    DTRAIN_FAULT="stop@train:step=3,rank=1"         SIGSTOP this rank (a hung peer)
    DTRAIN_FAULT="perturb@train:step=3,rank=1"      nudge one parameter on this rank (a silent divergence)

Several faults are separated by ';'. A fault fires only in a run that started from step 0: a worker that resumed
(restarted by torchrun, or `--resume`) runs clean. Unset, this module does nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

_ACTIONS = ("kill", "nan", "stop", "perturb")
_SITES = ("train", "checkpoint", "loss")


@dataclass(frozen=True)
class Fault:
    action: str
    site: str
    step: int
    rank: int


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        try:
            head, _, args = item.partition(":")
            action, _, site = head.partition("@")
            kv = dict(a.split("=", 1) for a in args.split(",") if a)
            fault = Fault(action, site, int(kv["step"]), int(kv.get("rank", 0)))
        except (ValueError, KeyError):
            raise ValueError(f"DTRAIN_FAULT: cannot parse {item!r} (expected e.g. kill@train:step=5,rank=1)") from None
        if fault.action not in _ACTIONS or fault.site not in _SITES:
            raise ValueError(f"DTRAIN_FAULT: {item!r}: action must be one of {_ACTIONS}, site one of {_SITES}")
        faults.append(fault)
    return faults


_armed = True


def disarm() -> None:
    """No fault fires in this process from now on: the trainer calls it when it resumes, so a restarted worker
    runs clean, whatever restarted it (a failure, or a node leaving or joining an elastic job)."""
    global _armed
    _armed = False


def _active() -> list[Fault]:
    spec = os.environ.get("DTRAIN_FAULT", "")
    if not spec or not _armed:
        return []
    return parse(spec)


def fire(site: str, step: int, rank: int, model: torch.nn.Module | None = None) -> None:
    """Process faults (kill, stop, perturb) due at this site, step and rank."""
    for f in _active():
        if (f.site, f.step, f.rank) != (site, step, rank):
            continue
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif f.action == "perturb" and model is not None:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-3


def corrupt_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    for f in _active():
        if (f.action, f.site, f.step, f.rank) == ("nan", "loss", step, rank):
            return loss * float("nan")
    return loss

"""Atomic, verifiable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `checkpoints/step_00000120/`:
    .metadata, __*.distcp   model + optimizer, through DCP (replicated tensors written once)
    deepspeed/...           instead of DCP when the engine stores model + optimizer itself (`engine.state_format`,
                            DeepSpeed ZeRO-1: its own checkpoint, one optimizer partition per rank)
    rank{r}.pt              what differs by rank: strategy memory (error feedback, warm starts), RNG states
    meta.json               step, data position, scheduler, world size, state format, and a manifest (size +
                            sha256 of every file, subdirectories included) written last

Atomicity: everything is written into `step_X.partial/`; after a barrier rank 0 writes meta.json and renames
the directory to `step_X/`. A killed save leaves only a `.partial` directory, which is never loaded. On resume
the newest checkpoint whose manifest verifies is used; a corrupt one is skipped (with a warning) for the
previous one. Run directories are assumed to be on a file system every rank can see (one machine, or a
shared volume).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import faults
from .config import ConfigError
from .distributed import barrier, broadcast_
from .rundir import write_json_atomic

_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {
        name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
        if (name := p.relative_to(directory).as_posix()) != "meta.json"
    }


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return f"unreadable meta.json ({err})"
    for name, want in meta.get("manifest", {}).items():
        f = directory / name
        if not f.exists():
            return f"missing {name}"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} checksum mismatch"
    if not meta.get("manifest"):
        return "empty manifest"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX) :]))


class Checkpointer:
    def __init__(
        self, root: Path, rank: int, world_size: int, keep: int = 2, warn: Callable[[str], None] = print
    ) -> None:
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.warn = warn

    # ---------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        local_state: dict[str, Any],
        meta: dict[str, Any],
        engine: Any = None,
    ) -> Path:
        """`engine`: when its `state_format` is set, it saves model + optimizer (`engine.save_state`), not DCP."""
        final = self.root / f"{_PREFIX}{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        state_format = _state_format(engine)
        if state_format == "dcp":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
        else:
            engine.save_state(partial)
        torch.save(local_state, partial / f"rank{self.rank}.pt")
        faults.fire("checkpoint", step, self.rank)
        barrier()
        if self.rank == 0:
            full_meta = dict(
                meta, step=step, world_size=self.world_size, state_format=state_format, manifest=_manifest(partial)
            )
            write_json_atomic(partial / "meta.json", full_meta)
            _fsync_dir(partial)
            if final.exists():  # re-saving a step after a resume: swap, never leave no checkpoint
                stale = final.with_name(final.name + ".old")
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(partial, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(partial, final)
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in self.root.glob(f"{_PREFIX}*.partial"):
            shutil.rmtree(stray, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- load
    def latest_valid(self) -> Path | None:
        """Rank 0 picks the newest intact checkpoint; every rank gets the same answer."""
        chosen = -1
        if self.rank == 0:
            for path in reversed(list_checkpoints(self.root)):
                reason = verify(path)
                if reason is None:
                    chosen = int(path.name[len(_PREFIX) :])
                    break
                self.warn(f"checkpoint {path} is unusable ({reason}); trying the previous one")
        chosen = int(broadcast_(torch.tensor([chosen], dtype=torch.int64), src=0).item())
        return None if chosen < 0 else self.root / f"{_PREFIX}{chosen:08d}"

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, engine: Any = None
    ) -> tuple[dict, dict]:
        """Restore model and optimizer in place; returns (meta, this rank's local state)."""
        meta = json.loads((path / "meta.json").read_text())
        saved, wanted = meta.get("state_format", "dcp"), _state_format(engine)
        if saved != wanted:
            raise ConfigError(
                f"checkpoint {path} stores model and optimizer as {saved!r}, this run needs {wanted!r} "
                "(train.engine or train.zero_stage differ from the run that wrote it)"
            )
        if wanted == "dcp":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            if meta.get("world_size") != self.world_size:
                raise ConfigError(
                    f"checkpoint {path} holds optimizer state partitioned over {meta.get('world_size')} "
                    f"ranks ({saved}); resume it with {meta.get('world_size')} ranks, not "
                    f"{self.world_size}"
                )
            engine.load_state(path)
        local_path = path / f"rank{self.rank}.pt"
        local: dict[str, Any] = {}
        if meta.get("world_size") == self.world_size and local_path.exists():
            local = torch.load(local_path, weights_only=False)
        elif self.rank == 0:
            self.warn(
                f"checkpoint was written by {meta.get('world_size')} ranks, this job has {self.world_size}: "
                "restoring model and optimizer; per-rank strategy memory and RNG start fresh"
            )
        return meta, local


def _state_format(engine: Any) -> str:
    return getattr(engine, "state_format", None) or "dcp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

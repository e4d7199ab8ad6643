"""Atomic, verifiable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `checkpoints/step_00000120/`:
    .metadata, __*.distcp   model + optimizer, through DCP (replicated tensors written once)
    deepspeed/...           instead of DCP when the engine stores model + optimizer itself (`engine.state_format`,
                            DeepSpeed ZeRO-1: its own checkpoint, one optimizer partition per rank)
    rank{r}.pt              what differs by rank: strategy memory (error feedback, warm starts), RNG states
    meta.json               step, data position, scheduler, world size, torchrun job id, state format, and a
                            manifest (size + sha256 of every file, subdirectories included) written last

Atomicity: everything is written into `step_X.partial/`; after a barrier rank 0 writes meta.json and renames
the directory to `step_X/`. A killed save leaves only a `.partial` directory, which is never loaded. On resume
the newest checkpoint whose manifest verifies is used; a corrupt one is skipped (with a warning) for the
previous one. Run directories are assumed to be on a file system every rank can see (one machine, or a
shared volume). Loading runs no code from the files: every pickle in them is read through an allow-list
(dtrain/safeload.py).
"""

from __future__ import annotations

import io
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import faults
from .config import ConfigError
from .distributed import all_gather_objects, all_ranks_agree, broadcast_
from .manifest import damage, manifest
from .metrics import format_bytes
from .rundir import write_json_atomic
from .safeload import dcp_failure, dcp_load, load_local

_PREFIX = "step_"
META_FILE = "meta.json"


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


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    meta_path = directory / META_FILE
    if not meta_path.exists():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return f"unreadable meta.json ({err})"
    return damage(directory, meta.get("manifest", {}))


class CheckpointNotSaved(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the earlier ones are intact."""


def _why(err: BaseException) -> str:
    """One line for a failed write: the errno's words and the file for an OSError (a full disk)."""
    if isinstance(err, CheckpointException):
        rank, exc = dcp_failure(err)
        return f"rank {rank}: {_why(exc)}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX) :]))


def job_id() -> str | None:
    """The id of the torchrun job this process belongs to (its --rdzv-id; --standalone draws one per launch), or
    None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def saved_by_this_job(root: Path) -> bool:
    """Whether a checkpoint under `root` was saved by this torchrun job: then this process is one of its restarted
    workers. torchrun restarts workers after a failure (--max-restarts) and whenever a node leaves or joins an
    elastic job (--nnodes MIN:MAX), but TORCHELASTIC_RESTART_COUNT counts only the failures, and a node that joins
    starts its own count at 0: the count cannot tell a restart from a first start, the job id in meta.json can."""
    job = job_id()
    if job is None:
        return False
    for path in list_checkpoints(root):
        try:
            if json.loads((path / META_FILE).read_text()).get("job") == job:
                return True
        except (OSError, ValueError):
            continue  # an unfinished or damaged checkpoint says nothing about who wrote it
    return False


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
        """`engine`: when its `state_format` is set, it saves model + optimizer (`engine.save_state`), not DCP.

        Raises CheckpointNotSaved on every rank when any rank could not write its part (a full disk, a quota):
        the partial directory is removed and the checkpoints saved before are untouched."""
        final = self.root / f"{_PREFIX}{step:08d}"
        partial = final.with_name(final.name + ".partial")
        state_format = _state_format(engine)

        def prepare() -> None:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)

        def write() -> None:
            if state_format == "dcp":
                model_sd, optim_sd = get_state_dict(model, optimizer)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
            else:
                engine.save_state(partial)
            buf = io.BytesIO()  # serialised in memory, written with plain file I/O: a full disk says so by errno
            torch.save(local_state, buf)
            (partial / f"rank{self.rank}.pt").write_bytes(buf.getvalue())
            faults.fire("checkpoint", step, self.rank)

        def publish() -> None:
            if self.rank != 0:
                return
            full_meta = dict(
                meta,
                step=step,
                world_size=self.world_size,
                job=job_id(),
                state_format=state_format,
                manifest=manifest(partial, exclude=META_FILE),
            )
            write_json_atomic(partial / META_FILE, full_meta)
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

        for phase in (prepare, write, publish):  # each ends with every rank agreeing that it worked
            self._together(phase, final, partial)
        return final

    def _together(self, phase: Callable[[], None], final: Path, partial: Path) -> None:
        """Run this rank's part of a save phase; if it failed on any rank, remove the partial directory and raise
        CheckpointNotSaved on every rank, with each failing rank's reason."""
        why = None
        try:
            phase()
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            # the free space now, before the partial save is removed: torch.save reports a full disk as an
            # opaque RuntimeError, this says it
            free = shutil.disk_usage(self.root).free if self.root.exists() else 0
            why = f"{_why(err)}; {format_bytes(free)} free on its file system"
        if all_ranks_agree(why is None):
            return
        reasons = sorted({r for r in all_gather_objects(why) if r is not None})
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        good = list_checkpoints(self.root)
        raise CheckpointNotSaved(
            f"checkpoint {final} not saved ({'; '.join(reasons)}); "
            + (f"the last good checkpoint, {good[-1].name}, is intact" if good else "there is no earlier checkpoint")
        )

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
        meta = json.loads((path / META_FILE).read_text())
        saved, wanted = meta.get("state_format", "dcp"), _state_format(engine)
        if saved != wanted:
            raise ConfigError(
                f"checkpoint {path} stores model and optimizer as {saved!r}, this run needs {wanted!r} "
                "(train.engine or train.zero_stage differ from the run that wrote it)"
            )
        if wanted == "dcp":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp_load(state, path)
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
            local = load_local(local_path)
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

"""Reading a checkpoint's pickles without running code they contain.

A pickle may name any function for the unpickler to call, so a crafted checkpoint file could run anything on
load; the SHA-256 manifest does not help against whoever wrote the files. Every pickle dtrain reads back goes
through an allow-list instead:

    rank{r}.pt                 torch.load(weights_only=True), plus the numpy types of np.random.get_state()
    .metadata (DCP)            a restricted unpickler: DCP's metadata dataclasses and enums, torch.Size, dtypes,
                               layouts, paths
    __*.distcp (DCP)           tensors: torch.load(weights_only=True) inside DCP already; the non-tensor values
                               (optimizer hyper-parameters) through a planner that loads them the same way

(torch's own FileSystemReader unpickles `.metadata` with plain pickle and its DefaultLoadPlanner loads non-tensor
values with weights_only=False: `dcp_load` replaces both.) Anything else is refused with `UnsafeCheckpoint`, one
line naming the file and what it asked for.
"""

from __future__ import annotations

import enum
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .config import ConfigError

METADATA_FILE = ".metadata"

#: np.random.get_state() holds a uint32 array: these rebuild it (and nothing else)
_NUMPY_RNG_GLOBALS = [
    np.ndarray.__reduce__(np.zeros(1, np.uint32))[0],  # numpy's _reconstruct (numpy.core or numpy._core)
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
#: what else DCP's .metadata pickles (besides the dataclasses of its metadata module and torch dtypes)
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds a pickle that asks for more than a checkpoint ever contains."""


def _refused(path: Path | str, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"checkpoint file {path} is refused: its pickle asks for {what}, which no dtrain checkpoint holds "
        "(a crafted or foreign file; nothing in it was run)"
    )


def _weights_only_refusal(path: Path | str, err: pickle.UnpicklingError) -> UnsafeCheckpoint:
    """torch's many-line weights_only message, down to the global it refused."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err)) or re.search(
        r"WeightsUnpickler error: ([^\n]+)", str(err)
    )
    return _refused(path, found.group(1) if found else "something outside the allow-list")


def load_local(path: Path) -> dict[str, Any]:
    """A rank's local state (rank{r}.pt): tensors, numbers, strings, containers and numpy's RNG state only."""
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _weights_only_refusal(path, err) from None


def _enum_member(cls: Any, name: str) -> Any:
    """What `builtins.getattr` may do in a `.metadata` pickle: fetch a member of one of DCP's metadata enums. Some
    Python releases (3.11.2, Debian bookworm's) pickle an enum member as getattr(EnumClass, NAME); a free getattr
    would reach any attribute of any allowed class (PosixPath.write_text, then a call to it)."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__module__ == _DCP_METADATA_MODULE:
        if name in cls.__members__:
            return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r})")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # checked before the module is imported: importing a module can run code too
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:  # its own classes, not what it imports
                return found
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` through the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise _refused(path, str(err)) from None
    if not isinstance(metadata, Metadata):
        raise _refused(path, type(metadata).__name__ + " instead of DCP's Metadata")
    return metadata


class _Reader(FileSystemReader):
    """DCP's file reader, with `.metadata` read through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's default planner, with non-tensor values loaded weights_only (DefaultLoadPlanner: weights_only=False)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict[str, Any], directory: Path) -> None:
    """dcp.load(state, directory) with every pickle in it read through an allow-list."""
    read_dcp_metadata(directory / METADATA_FILE)  # refused here, with one line, before DCP starts collectives
    try:
        dcp.load(state, storage_reader=_Reader(directory), planner=_Planner())
    except CheckpointException as err:  # a BaseException whose message holds every rank's traceback
        for exc, _trace in err.failures.values():
            if isinstance(exc, pickle.UnpicklingError):
                raise _weights_only_refusal(directory, exc) from None
        rank, exc = dcp_failure(err)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise RuntimeError(f"checkpoint {directory} did not load: rank {rank}: {type(exc).__name__}: {first}") from None


def dcp_failure(err: CheckpointException) -> tuple[int, BaseException]:
    """The first failing rank of a DCP save or load and its exception (without DCP's tracebacks)."""
    rank, (exc, _trace) = next(iter(err.failures.items()))
    return rank, exc

"""The run directory: a public interface (docs/outputs.md). Only rank 0 writes here.

config.yaml     the resolved config
metrics.jsonl   one JSON object per line (training rows and eval rows)
summary.json    final figures
model.pt        the final model state_dict (torch.save)
checkpoints/    DCP checkpoints (checkpoint.py)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import Config, ConfigError, dump_config
from .metrics import METRICS_FILE, STEP, SUMMARY_FILE, read_metrics


def default_run_dir(cfg: Config, config_path: str | None, world_size: int) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    name = cfg.run.name or (Path(config_path).stem if config_path else "run")
    return Path("runs") / f"{name}-{cfg.comm.strategy}-w{world_size}"


def check_writable(path: Path) -> None:
    """Fail early with one line, instead of after minutes of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run directory {path} is not writable: {err.strerror or err}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information readable
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written .tmp behind
        raise
    os.replace(tmp, path)


def _metrics_line(row: dict[str, Any]) -> str:
    """One row of metrics.jsonl (dtrain.metrics.read_metrics reads it back)."""
    return json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"


def _append_whole(handle: BinaryIO, data: bytes) -> None:
    """Append `data` to an unbuffered file, or nothing of it: a write the disk cannot take (ENOSPC, a quota) is
    cut back to where it started, so the file never ends in half a line."""
    start = handle.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[handle.write(view) :]
    except OSError:
        handle.truncate(start)
        raise


class RunDir:
    def __init__(self, path: Path, active: bool) -> None:
        self.path = path
        self.active = active  # rank 0 writes; other ranks hold a no-op RunDir
        self._metrics = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def open(self, cfg: Config, resume: bool) -> None:
        if not self.active:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))
        if not resume:
            for stale in (METRICS_FILE, SUMMARY_FILE, "model.pt"):
                (self.path / stale).unlink(missing_ok=True)
        self._metrics = open(self.path / METRICS_FILE, "ab", buffering=0)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint (and a last line cut short by the crash), so each step
        appears once."""
        if not self.active:
            return
        if self._metrics:
            self._metrics.close()
        kept = [row for row in read_metrics(self.path) if row.get(STEP, 0) <= step]
        path = self.path / METRICS_FILE
        path.write_text("".join(_metrics_line(row) for row in kept))
        self._metrics = open(path, "ab", buffering=0)

    def log(self, row: dict[str, Any]) -> None:
        if self._metrics is not None:
            _append_whole(self._metrics, _metrics_line(row).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.active:
            write_json_atomic(self.path / SUMMARY_FILE, summary)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.active:
            tmp = self.path / "model.pt.tmp"
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
            os.replace(tmp, self.path / "model.pt")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

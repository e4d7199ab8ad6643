"""Checkpoints whose model and optimizer state an engine stores itself (as DeepSpeed's does): the state is in the
manifest, and its format and partitioning are checked before a load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


class _FakeEngine:
    """An engine that stores model + optimizer itself, in a subdirectory (as DeepSpeed's does)."""

    state_format = "fake"

    def __init__(self) -> None:
        self.loaded = None

    def save_state(self, directory: Path) -> None:
        (directory / "fake" / "part").mkdir(parents=True)
        (directory / "fake" / "part" / "optim.bin").write_bytes(b"partition")

    def load_state(self, directory: Path) -> None:
        self.loaded = (directory / "fake" / "part" / "optim.bin").read_bytes()


def test_engine_owned_state_is_in_the_manifest_and_its_format_is_checked(tmp_path: Path):
    import torch

    from dtrain.checkpoint import Checkpointer, verify
    from dtrain.config import ConfigError

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    path = ckpt.save(3, model, opt, {"x": 1}, {"scheduler": {}}, engine=_FakeEngine())
    meta = json.loads((path / "meta.json").read_text())
    assert meta["state_format"] == "fake" and set(meta["manifest"]) == {"fake/part/optim.bin", "rank0.pt"}
    assert verify(path) is None and ckpt.latest_valid() == path
    engine = _FakeEngine()
    assert ckpt.load(path, model, opt, engine=engine)[1] == {"x": 1} and engine.loaded == b"partition"
    with pytest.raises(ConfigError, match="stores model and optimizer as 'fake', this run needs 'dcp'"):
        ckpt.load(path, model, opt)
    with pytest.raises(ConfigError, match="partitioned over 1 ranks .* not 2"):
        Checkpointer(tmp_path, rank=0, world_size=2).load(path, model, opt, engine=engine)
    (path / "fake" / "part" / "optim.bin").write_bytes(b"partitioN")  # a nested file is covered too
    assert verify(path) == "fake/part/optim.bin checksum mismatch"


def test_a_torchrun_worker_resumes_only_from_its_own_jobs_checkpoints(tmp_path: Path, monkeypatch):
    """The job id in meta.json decides whether a worker under torchrun is a restarted one (torchrun's restart count
    cannot: a node joining or leaving an elastic job does not advance it)."""
    from dtrain.checkpoint import META_FILE, saved_by_this_job

    def checkpoint(step: int, meta: str) -> None:
        path = tmp_path / f"step_{step:08d}"
        path.mkdir()
        (path / META_FILE).write_text(meta)

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not saved_by_this_job(tmp_path / "missing")
    checkpoint(10, json.dumps({"step": 10, "job": "job-a"}))
    assert not saved_by_this_job(tmp_path), "outside torchrun a run resumes only when asked to (--resume)"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert not saved_by_this_job(tmp_path), "another job's checkpoint: a fresh start"
    checkpoint(20, "{ cut short")  # a damaged meta.json says nothing about who wrote it
    (tmp_path / "step_00000030").mkdir()  # nor does a missing one
    assert not saved_by_this_job(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert saved_by_this_job(tmp_path)

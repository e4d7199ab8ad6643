"""A full disk: the run directory on a small tmpfs that fills during a checkpoint (root only: mount).

The save fails with one line, the `.partial` directory is removed, the last good checkpoint stays intact and
loadable, metrics.jsonl never ends in half a line, and `checkpoint.on_error` decides whether training goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtrain.checkpoint import list_checkpoints, verify
from dtrain.config import load_config
from dtrain.metrics import METRICS_FILE
from dtrain.rundir import RunDir
from tests.helpers.launch import ROOT, model_state, train
from tests.helpers.oracles import max_rel_diff

pytestmark = [
    pytest.mark.root,
    pytest.mark.faults,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs"),
]

PAGE = 4096
#: a model whose checkpoint (weights + Adam moments, ~0.8 MB) dwarfs everything else the run writes
RUN = ("model.d_model=64", "checkpoint.every=2")


def _mounts(under: Path) -> list[str]:
    """The mount points at or below `under` (other jobs on the machine mount and unmount elsewhere)."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [p for p in points if Path(p) == under or under in Path(p).parents]


@contextlib.contextmanager
def small_filesystem(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `where`, unmounted afterwards whatever happens; the mounts below `where`'s
    parent are checked to be as they were."""
    before = _mounts(where.parent)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode:  # still busy: detach it, never leave it mounted
            subprocess.run(["umount", "--lazy", str(where)], check=True)
        assert _mounts(where.parent) == before


def _pages(path: Path) -> int:
    """Bytes the files under `path` take on a tmpfs (whole pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def _complete_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Callable[[int], Path]:
    """The run directory of an uninterrupted run on `nproc` ranks, on an ordinary disk (one run per nproc)."""
    runs: dict[int, Path] = {}

    def run_on(nproc: int) -> Path:
        if nproc not in runs:
            runs[nproc] = tmp_path_factory.mktemp("full_disk") / f"uninterrupted-w{nproc}"
            train(runs[nproc], *RUN, nproc=nproc)
        return runs[nproc]

    return run_on


def _size_between(run: Path) -> int:
    """Room for everything an uninterrupted run leaves (one checkpoint, model.pt, the small files) plus 64 kB, but
    not for a second checkpoint next to the first: the second save fills the disk."""
    checkpoint = _pages(list_checkpoints(run / "checkpoints")[-1])
    rest = _pages(run) - _pages(run / "checkpoints")
    size = rest + checkpoint + 16 * PAGE
    assert size < rest - _pages(run / "model.pt") + 2 * checkpoint  # so the second checkpoint cannot fit
    return size


def test_metrics_never_end_in_half_a_line_when_the_disk_fills(tmp_path: Path):
    with small_filesystem(tmp_path / "fs", 64 * 1024) as fs:
        rundir = RunDir(fs / "run", active=True)
        rundir.open(load_config(None), resume=False)
        try:
            row = {"step": 1, "train/loss": 0.5, "note": "x" * 300}
            rundir.log(row)
            with open(fs / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * PAGE)
            logged = 1
            with pytest.raises(OSError, match="No space left"):
                for _ in range(1000):
                    rundir.log(row)
                    logged += 1
            assert len(_complete_lines(fs / "run" / METRICS_FILE)) == logged
            (fs / "filler").unlink()
            rundir.log(row)  # space again: the file carries on with whole lines
        finally:
            rundir.close()
        assert len(_complete_lines(fs / "run" / METRICS_FILE)) == logged + 1


@pytest.mark.parametrize("policy, nproc", [("stop", 1), ("warn", 1), pytest.param("stop", 2, marks=pytest.mark.slow)])
def test_a_disk_that_fills_during_a_checkpoint(tmp_path: Path, uninterrupted, policy: str, nproc: int):
    oracle = uninterrupted(nproc)
    with small_filesystem(tmp_path / "fs", _size_between(oracle)) as fs:
        run = fs / "run"
        proc = train(run, *RUN, f"checkpoint.on_error={policy}", nproc=nproc, check=False)
        assert 'File "' + str(ROOT / "dtrain") not in proc.stderr, proc.stderr[-3000:]  # no dtrain traceback
        assert not list((run / "checkpoints").glob("*.partial"))
        kept = list_checkpoints(run / "checkpoints")
        assert [p.name for p in kept] == ["step_00000002"] and verify(kept[0]) is None
        steps = [row["step"] for row in _complete_lines(run / METRICS_FILE) if "train/loss" in row]
        if policy == "stop":
            # one line, the same on every rank (each rank prints it; rank 1's says so)
            errors = {
                line.replace(" (rank 1)", "") for line in proc.stderr.splitlines() if line.startswith("dtrain: error")
            }
            assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
            (error,) = errors
            assert "step_00000004 not saved (rank " in error and " free on its file system" in error, error
            assert "the last good checkpoint, step_00000002, is intact (checkpoint.on_error=stop)" in error
            assert steps == [1, 2, 3, 4]
            # the checkpoint left behind loads: with room again, the run resumes from it to the uninterrupted model
            subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
            resumed = train(run, *RUN, nproc=nproc, resume=True)
            assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
        else:
            warnings = [line for line in proc.stderr.splitlines() if "training goes on" in line]
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert [("step_00000004" in w, "step_00000006" in w) for w in warnings] == [(True, False), (False, True)]
            assert all(" free on its file system" in w and "checkpoint.on_error=warn" in w for w in warnings)
            assert steps == [1, 2, 3, 4, 5, 6]
        assert max_rel_diff(model_state(oracle), model_state(run)) == 0.0

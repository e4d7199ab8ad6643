"""The security review's points about what a run writes (docs/security.md): secrets in the environment never reach
the run directory or the logs, and every file and directory is created with the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers.launch import train

SECRETS = {
    "WANDB_API_KEY": "fake-wandb-key-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_fakeTokenForTheSecurityTest0123456789",
    "AWS_SECRET_ACCESS_KEY": "fake/aws/secret/key/for/the/test/0123456789",
}


@pytest.fixture(scope="module")
def run_under_umask(tmp_path_factory) -> tuple[Path, str]:
    """A tiny 2-rank run with a checkpoint, an offline wandb run and fake secrets in its environment, started
    under umask 027; its run directory and everything it printed."""
    pytest.importorskip("wandb")
    run = tmp_path_factory.mktemp("secrets") / "run"
    previous = os.umask(0o027)
    try:
        proc = train(run, "log.wandb=offline", nproc=2, extra_env={"WANDB_MODE": "offline", **SECRETS})
    finally:
        os.umask(previous)
    return run, proc.stdout + proc.stderr


def test_secrets_from_the_environment_reach_no_file_and_no_log(run_under_umask):
    run, logs = run_under_umask
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "plan.json", "model.pt", "meta.json"} <= names
    assert any("wandb" in p.parts for p in files)  # the offline wandb run is searched too
    leaked = [
        f"{p.relative_to(run)}: {name}"
        for p in files
        for name, value in SECRETS.items()
        if value.encode() in p.read_bytes()
    ]
    assert not leaked, leaked
    assert not [name for name, value in SECRETS.items() if value in logs]


def test_files_and_directories_follow_the_umask_and_none_is_world_writable(run_under_umask):
    run, _ = run_under_umask
    paths = [run, *run.rglob("*")]
    too_open = [
        f"{p.relative_to(run)}: {stat.filemode(p.lstat().st_mode)}"
        for p in paths
        if not p.is_symlink() and p.lstat().st_mode & 0o027
    ]
    assert len(paths) > 10 and not too_open, too_open

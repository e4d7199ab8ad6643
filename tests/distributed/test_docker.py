"""docker/docker-compose.yml validated by a compose implementation, where one is installed ($DOCKER_COMPOSE,
docker-compose, or `docker compose`); tests/unit/test_docker.py checks the same file as data everywhere;
launch/compose_cluster refuses bad input before it installs or starts anything (its real runs:
tests/distributed/test_compose_cluster.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.helpers.launch import ROOT, TINY, env

DOCKER = ROOT / "docker"


def _compose_cli() -> list[str] | None:
    """A compose implementation to validate the file with: $DOCKER_COMPOSE, docker-compose, or `docker compose`."""
    if os.environ.get("DOCKER_COMPOSE"):
        return os.environ["DOCKER_COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose / docker-compose (set DOCKER_COMPOSE=...)")
def test_compose_itself_accepts_the_file():
    cli = _compose_cli()
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    proc = subprocess.run(
        [*cli, "-f", str(DOCKER / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(services)


def test_compose_cluster_refuses_bad_input_before_installing_anything():
    proc = subprocess.run(
        [
            str(ROOT / "launch" / "compose_cluster"),
            "--nodes",
            "2",
            "--",
            "--config",
            TINY,
            "--set",
            "train.batch_size=7",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "compose_cluster: error: train.batch_size=7 is not divisible by the world size 2"
    ]

"""docker/docker-compose.yml validated by a compose implementation, where one is installed ($DOCKER_COMPOSE,
docker-compose, or `docker compose`); tests/unit/test_docker.py checks the same file as data everywhere."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.helpers.launch import ROOT

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

"""docker/ checked as data (no Docker engine needed): the compose file's services form one torchrun job whose dtrain
part is a valid `dtrain train` call, the image build installs torch before dtrain, and the entrypoint shapes the
link only when asked. tests/distributed/test_docker.py has a compose implementation validate the file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.launch import ROOT

DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nodes(compose) -> dict[str, dict]:
    services = compose["services"]
    assert services and all(re.fullmatch(r"node\d+", name) for name in services), sorted(services)
    return services


def _flags(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """torchrun's `--key=value` flags (up to `-m`), and everything after `-m`."""
    assert command[0] == "torchrun", command
    m = command.index("-m")
    flags = dict(arg[2:].split("=", 1) for arg in command[1:m])
    return flags, command[m + 1 :]


def test_every_node_runs_torchrun_with_c10d_rendezvous_on_node0(nodes):
    ranks = []
    for name, svc in nodes.items():
        flags, _ = _flags(svc["command"])
        assert flags["nnodes"] == str(len(nodes)), name
        assert flags["rdzv-backend"] == "c10d" and flags["rdzv-endpoint"].split(":")[0] == "node0", name
        assert flags["rdzv-id"] == _flags(nodes["node0"]["command"])[0]["rdzv-id"], "one job id for all nodes"
        assert flags["rdzv-conf"] == f"is_host={1 if name == 'node0' else 0}", name
        assert svc["hostname"] == name
        ranks.append(int(flags["node-rank"]))
        if name != "node0":
            assert "node0" in svc["depends_on"], f"{name} must start after the rendezvous host"
    assert sorted(ranks) == list(range(len(nodes)))


def test_every_node_shares_the_run_volume_and_can_shape_its_link(compose, nodes):
    for name, svc in nodes.items():
        volume, target = svc["volumes"][0].split(":")[:2]
        assert volume in compose["volumes"] and target == "/runs", name
        assert "NET_ADMIN" in svc["cap_add"], name
        assert svc["environment"]["GLOO_SOCKET_IFNAME"] == "eth0", name
        assert "DTRAIN_RATE" in svc["environment"], name
        assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_each_command_is_a_valid_dtrain_train_call(nodes):
    from dtrain.cli import _build_parser
    from dtrain.config import load_config
    from dtrain.rundir import default_run_dir

    run_dirs = set()
    for name, svc in nodes.items():
        flags, module_args = _flags(svc["command"])
        assert module_args[0] == "dtrain", name
        args = _build_parser().parse_args(module_args[1:])
        assert args.command == "train"
        # the image's working directory holds configs/ as in the repository
        cfg = load_config(ROOT / args.config, args.overrides)
        world = len(nodes) * int(flags["nproc-per-node"])
        run_dirs.add(str(default_run_dir(cfg, args.config, world)))
    assert len(run_dirs) == 1 and run_dirs.pop().startswith("/runs/"), "one run directory, on the shared volume"


def test_dockerfile_pins_torch_before_installing_dtrain_and_takes_a_cuda_base_as_build_arg():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    torch_install = text.index('pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"')
    dtrain_install = text.index("pip install --no-cache-dir .")
    assert torch_install < dtrain_install
    assert "ARG TORCH_SPEC=torch==" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), f"COPY {copied}: not in the build context"


def test_entrypoint_is_valid_sh_and_only_shapes_when_asked(tmp_path: Path):
    script = DOCKER / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    hello = tmp_path / "hello"
    hello.write_text('#!/bin/sh\necho ran "$@"\n')
    hello.chmod(0o755)
    # only hello on PATH, no tc: without DTRAIN_RATE the entrypoint must just run the command
    proc = subprocess.run([str(script), "hello", "x"], capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout == "ran x\n"
    # with DTRAIN_RATE and no way to shape, it stops with one line instead of running unshaped
    proc = subprocess.run(
        [str(script), "hello"], capture_output=True, text=True, env={"PATH": str(tmp_path), "DTRAIN_RATE": "100mbit"}
    )
    assert proc.returncode == 2 and proc.stdout == "" and "cannot shape eth0" in proc.stderr

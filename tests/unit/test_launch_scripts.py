"""The launch/ directory as files: the Slurm script, the DeepSpeed hostfile, executable bits, and the netns tool's
refusal without root (its main() called in this process)."""

from __future__ import annotations

import os
import subprocess

from tests.helpers.launch import ROOT, TINY

LAUNCH = ROOT / "launch"


def test_slurm_script_is_valid_bash_with_a_usage_header():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "# usage: sbatch" in text and "srun" in text and "--rdzv-backend c10d" in text
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0


def test_hostfile_example_is_in_deepspeed_format():
    lines = [
        ln.split()
        for ln in (LAUNCH / "hostfile.example").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines and all(len(ln) == 2 and ln[1].startswith("slots=") and ln[1][6:].isdigit() for ln in lines)


def test_scripts_are_executable():
    for name in (
        "torchrun_single.sh",
        "torchrun_multinode.sh",
        "deepspeed.sh",
        "slurm.sbatch",
        "netns_cluster",
        "compose_cluster",
    ):
        assert os.access(LAUNCH / name, os.X_OK), name


def test_without_root_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("netns_cluster", ROOT / "launch" / "netns_cluster.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool.os, "geteuid", lambda: 1000)
    assert tool.main(["--hosts", "2", "--", "--config", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs root" in err

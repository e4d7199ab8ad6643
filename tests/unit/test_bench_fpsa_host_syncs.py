"""bench.fpsa_host_syncs at a tiny size: the 'before' model from git and the current one stay bitwise equal, and
the current one makes fewer host syncs per step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT


def _has_revision(rev: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0


def test_fpsa_host_syncs_tiny(monkeypatch, capsys, tmp_path):
    from bench import fpsa_host_syncs

    for rev in (fpsa_host_syncs.BASELINE, fpsa_host_syncs.AFTER):
        if not _has_revision(rev):
            pytest.skip(f"git revision {rev} (a compared model) is not in this checkout")
    docs = tmp_path / "benchmarks.md"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "fpsa_host_syncs.py"), "--tiny", "--docs", str(docs)])
    fpsa_host_syncs.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| `tests/configs/tiny.yaml`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    before, after = (int(n) for n in cells[3].split("→"))
    assert after < before and cells[-1] == "yes", row
    assert docs.read_text().count(fpsa_host_syncs.SECTION) == 1

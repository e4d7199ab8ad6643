"""dtrain sweep with real training runs (2-process `dtrain train` jobs of the tiny config, and the netns cluster),
then a report over them. Both minutes long: marked slow."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dtrain.report import add_arguments as report_arguments
from dtrain.report import run as report_run
from dtrain.sweep import add_arguments, run
from tests.helpers.launch import TINY, netns_missing


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def report_on(out: Path, report_dir: Path) -> str:
    parser = argparse.ArgumentParser()
    report_arguments(parser)
    assert report_run(parser.parse_args([str(out), "--out", str(report_dir), "--wandb", "disabled"])) == 0
    return (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_sweep_end_to_end_and_report(tmp_path: Path) -> None:
    """Two real 2-process runs of the test suite's tiny config, then a report over them."""
    path = tmp_path / "e2e.yaml"
    path.write_text(f"base: {TINY}\nstrategies: [allreduce, powersgd]\nranks: [2]\nworld_sizes: [2]\n")
    out = tmp_path / "out"
    assert run(parse([str(path), "--out", str(out), "--wandb", "disabled"])) == 0
    text = report_on(out, tmp_path / "report")
    assert "| allreduce | — | 2 | 1 |" in text and "| powersgd | 2 | 2 | 1 |" in text


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_sweep_on_a_shaped_link(tmp_path: Path) -> None:
    path = tmp_path / "netns.yaml"
    path.write_text(f"base: {TINY}\nstrategies: [rankdad]\nranks: [2]\nworld_sizes: [2]\nlink_rates: [10mbit]\n")
    out = tmp_path / "out"
    assert run(parse([str(path), "--out", str(out), "--wandb", "disabled"])) == 0
    assert (out / "rankdad-r2-s0-w2-10mbit.netns.json").is_file()
    text = report_on(out, tmp_path / "report")
    assert "| rankdad | 2 | 2 | 10mbit | 1 |" in text

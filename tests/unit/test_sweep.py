"""dtrain sweep: grid expansion, validation, commands, resuming and failures, with a fake launcher."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from dtrain import sweep as sweep_mod
from dtrain.config import STRATEGIES, ConfigError
from dtrain.sweep import SweepPoint, add_arguments, load_sweep, run, run_logged
from tests.helpers.launch import ROOT


def write_sweep(directory: Path, body: str, base: str = "model:\n  d_model: 16\ncomm:\n  rank: 3\n") -> Path:
    (directory / "base.yaml").write_text(base)
    path = directory / "sweep.yaml"
    path.write_text(body)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


class FakeLauncher:
    """Records commands; 'trains' by writing summary.json into run.dir unless told to fail for a run."""

    def __init__(self, fail: tuple[str, ...] = (), exit_status: int = 1) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail
        self.exit_status = exit_status

    def __call__(self, argv: list[str], log: Path) -> int:
        self.commands.append(argv)
        run_dir = Path(next(a for a in argv if a.startswith("run.dir=")).split("=", 1)[1])
        log.write_text("fake training\n")
        if run_dir.name in self.fail:
            return self.exit_status
        (run_dir / "summary.json").write_text("{}")
        return 0


def test_grid_multiplies_only_compressed_strategies_by_rank(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        "base: base.yaml\nstrategies: [allreduce, powersgd, dad, rankdad]\n"
        "ranks: [1, 2]\nseeds: [0, 1]\nworld_sizes: [2, 4]\n",
    )
    sweep = load_sweep(path)
    names = [p.name for p in sweep.points]
    assert len(names) == 2 * 2 + 2 * 2 * 2 + 2 * 2 + 2 * 2 * 2 == len(set(names))  # seeds x sizes (x ranks)
    assert "allreduce-s1-w4" in names and "powersgd-r2-s0-w2" in names and "rankdad-r1-s1-w4" in names
    assert not any(n.startswith(("allreduce-r", "dad-r")) for n in names)
    assert sweep.base == tmp_path / "base.yaml"
    assert sweep.out == Path("runs/sweeps/sweep")  # default: named after the sweep file


def test_omitted_ranks_and_seeds_come_from_the_base_config(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, "base: base.yaml\nstrategies: [ddp-powersgd]\nworld_sizes: [2]\n"))
    assert sweep.points == [SweepPoint("ddp-powersgd", 3, 0, 2, None)]
    assert sweep.points[0].overrides() == ["comm.strategy=ddp-powersgd", "comm.rank=3", "train.seed=0"]


def test_set_accepts_dotted_and_nested_keys(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        "base: base.yaml\nstrategies: [allreduce]\nworld_sizes: [1]\n"
        "set:\n  train.steps: 7\n  comm: {factor_dtype: bf16}\n  data.task: 's5'\n"
        "  log.project: 'two words'\n",
    )
    assert load_sweep(path).overrides == [
        "train.steps=7",
        "comm.factor_dtype=bf16",
        "data.task=s5",
        "log.project=two words",
    ]


def test_base_is_found_next_to_the_sweep_file_or_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sweeps").mkdir()
    path = write_sweep(tmp_path / "sweeps", "base: configs/base.yaml\nstrategies: [ddp]\nworld_sizes: [2]\n")
    (tmp_path / "configs").mkdir()
    shutil.move(tmp_path / "sweeps" / "base.yaml", tmp_path / "configs" / "base.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_sweep(path).base == Path("configs/base.yaml")
    monkeypatch.chdir(tmp_path / "sweeps")
    with pytest.raises(ConfigError, match="base config 'configs/base.yaml' not found"):
        load_sweep(path)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "base: base.yaml\nstrategies: [allreduce]\nworld_sizes: [2]\nseed: [1]\n",
            r"unknown key 'seed' \(allowed: base, set, strategies, ranks, seeds, world_sizes, link_rates, out\)",
        ),
        (
            "base: base.yaml\nstrategies: [allreduce, topk]\nworld_sizes: [2]\n",
            "unknown strategy 'topk'; allowed: " + ", ".join(STRATEGIES),
        ),
        ("base: base.yaml\nworld_sizes: [2]\n", "missing key 'strategies'"),
        ("base: base.yaml\nstrategies: []\nworld_sizes: [2]\n", "strategies: .* is invalid"),
        ("base: base.yaml\nstrategies: [powersgd]\nranks: [0]\nworld_sizes: [2]\n", r"ranks\.0: 0 is invalid"),
        (
            "base: base.yaml\nstrategies: [ddp]\nworld_sizes: [2]\nset: {train.stepz: 3}\n",
            "unknown config key 'train.stepz'",
        ),
        (
            "base: base.yaml\nstrategies: [ddp]\nworld_sizes: [2]\nset: {comm.strategy: dad}\n",
            r"comm.strategy is set for each run by the sweep \(strategies\)",
        ),
        ("base: base.yaml\nstrategies: [ddp]\nworld_sizes: [2]\nlink_rates: [10mbps]\n", "link rate '10mbps'"),
        ("base: nowhere.yaml\nstrategies: [ddp]\nworld_sizes: [2]\n", "base config 'nowhere.yaml' not found"),
        (
            "base: base.yaml\nstrategies: [ddp]\nworld_sizes: [2, 3]\nset: {train.batch_size: 8}\n",
            r"\(run ddp-s0-w3\): train.batch_size=8 is not divisible by the world size 3",
        ),
        ("base: base.yaml\nstrategies: [ddp\n", "malformed YAML at line"),
        ("- base.yaml\n", "expected a mapping"),
    ],
)
def test_bad_sweep_files_are_config_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, body))


def test_point_configs_are_validated_before_anything_runs(tmp_path: Path) -> None:
    # the base alone is valid (allreduce), but ZeRO-2 rules out custom strategies such as powersgd
    path = write_sweep(
        tmp_path,
        "base: base.yaml\nstrategies: [allreduce, powersgd]\nworld_sizes: [2]\n",
        base="train:\n  engine: deepspeed\n  zero_stage: 2\n",
    )
    with pytest.raises(ConfigError, match=r"\(run powersgd-r4-s0-w2\): train.zero_stage=2"):
        load_sweep(path)


def test_missing_sweep_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep file not found"):
        run(parse([str(tmp_path / "none.yaml"), "--dry-run"]))


def test_dry_run_prints_commands_and_marks_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_sweep(
        tmp_path,
        "base: base.yaml\nstrategies: [allreduce, powersgd]\nranks: [2]\nworld_sizes: [2]\nset: {train.steps: 5}\n",
    )
    out = tmp_path / "out"
    (out / "allreduce-s0-w2").mkdir(parents=True)
    (out / "allreduce-s0-w2" / "summary.json").write_text("{}")
    assert run(parse([str(path), "--dry-run", "--out", str(out), "--wandb", "disabled"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("# done (summary.json exists): ")
    argv = shlex.split(lines[1])
    assert argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert argv[6:11] == ["-m", "dtrain", "train", "--config", str(tmp_path / "base.yaml")]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == [
        "train.steps=5",
        "comm.strategy=powersgd",
        "comm.rank=2",
        "train.seed=0",
        f"run.dir={out / 'powersgd-r2-s0-w2'}",
        "log.wandb=disabled",
        "log.progress=false",
    ]
    assert not (out / "powersgd-r2-s0-w2").exists()  # a dry run creates nothing


def test_sweep_resumes_and_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_sweep(
        tmp_path, "base: base.yaml\nstrategies: [allreduce, powersgd, rankdad]\nranks: [2]\nworld_sizes: [2]\n"
    )
    out = tmp_path / "out"
    args = parse([str(path), "--out", str(out), "--wandb", "disabled"])
    first = FakeLauncher(fail=("powersgd-r2-s0-w2",))
    assert run(args, first) == 1
    assert len(first.commands) == 3  # the failure did not stop the sweep
    printed = capsys.readouterr()
    assert f"failed: powersgd-r2-s0-w2 (log: {out / 'powersgd-r2-s0-w2' / 'train.log'})" in printed.out
    assert "FAILED powersgd-r2-s0-w2: exit status 1" in printed.out  # as it happens, above the progress bar
    point = json.loads((out / "rankdad-r2-s0-w2" / "sweep.json").read_text())
    assert point["strategy"] == "rankdad" and point["rank"] == 2 and point["link_rate"] is None
    assert point["command"] == first.commands[2]

    second = FakeLauncher()
    assert run(args, second) == 0
    assert [Path(c[c.index("--set") + 1 :][0]) for c in second.commands]  # only the failed run again:
    assert len(second.commands) == 1 and "comm.strategy=powersgd" in second.commands[0]
    assert "1 trained, 2 already done, 0 failed" in capsys.readouterr().out


def test_a_run_without_summary_is_a_failure(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "base: base.yaml\nstrategies: [ddp]\nworld_sizes: [2]\n")
    launcher = FakeLauncher(fail=("ddp-s0-w2",), exit_status=0)
    assert run(parse([str(path), "--out", str(tmp_path / "out")]), launcher) == 1


def test_link_rates_need_the_netns_cluster_and_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = write_sweep(tmp_path, "base: base.yaml\nstrategies: [dad]\nworld_sizes: [2]\nlink_rates: [10mbit, 1gbit]\n")
    args = parse([str(path), "--out", str(tmp_path / "out")])
    monkeypatch.setattr(sweep_mod, "NETNS_CLUSTER", tmp_path / "launch" / "netns_cluster")
    with pytest.raises(ConfigError, match="netns cluster script, which is missing"):
        run(args, FakeLauncher())
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "netns_cluster").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sweep_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root"):
        run(args, FakeLauncher())
    monkeypatch.setattr(sweep_mod.os, "geteuid", lambda: 0)
    launcher = FakeLauncher()
    assert run(args, launcher) == 0
    assert [c[:9] for c in launcher.commands] == [
        [
            str(tmp_path / "launch" / "netns_cluster"),
            "--hosts",
            "2",
            "--nproc-per-host",
            "1",
            "--rate",
            rate,
            "--",
            "--config",
        ]
        for rate in ("10mbit", "1gbit")
    ]
    assert (tmp_path / "out" / "dad-s0-w2-10mbit" / "summary.json").is_file()


def test_run_logged_captures_output_and_status(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    assert run_logged([sys.executable, "-c", code], log) == 3
    assert "to stdout" in log.read_text() and "to stderr" in log.read_text()


def test_shipped_sweeps_are_valid() -> None:
    quick = load_sweep(ROOT / "configs" / "sweeps" / "quick.yaml")
    assert [p.strategy for p in quick.points] == list(STRATEGIES)
    assert {p.world_size for p in quick.points} == {2}
    full = load_sweep(ROOT / "configs" / "sweeps" / "full.yaml")
    assert len(full.points) > len(quick.points)

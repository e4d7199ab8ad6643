"""dtrain report on synthetic run directories whose figures are known by construction."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from dtrain import metrics as metric
from dtrain.config import ConfigError
from dtrain.report import add_arguments, run
from dtrain.report.build import Report, make_report
from dtrain.report.rundir import load_run
from dtrain.report.table import Row, TaskTable
from dtrain.report.timemodel import LinkRate, parse_link_rate, parse_link_rates, steps_to_target, time_to_target

# 8 kbit/s = 1000 bytes/s and 1 mbit/s = 125 000 bytes/s keep the modelled times easy to check by hand.
RATES = "8kbit,1mbit"


def write_run(
    path: Path,
    *,
    task: str,
    strategy: str,
    rank: int,
    seed: int,
    payload: float,
    allreduce: float,
    wire: float,
    eval_accs: list[float],
    compute_s: float,
    comm_s: float = 0.01,
    iters_by_difficulty: dict[str, float] | None = None,
    iters_by_token_difficulty: dict[str, float] | None = None,
) -> None:
    """A finished run: evaluations every 10 steps, bytes growing by `payload` per step."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"data:\n  task: {task}\ncomm:\n  strategy: {strategy}\n")
    steps = 10 * (len(eval_accs) - 1)
    rows: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        rows.append(
            {
                metric.STEP: step,
                metric.TRAIN_LOSS: 2.0 / step,
                metric.COMM_BYTES_SENT: payload,
                metric.COMM_BYTES_CUM: payload * step,
                metric.COMM_WIRE_BYTES: wire,
                metric.TIME_STEP_S: compute_s + comm_s,
            }
        )
        if step % 10 == 0:
            rows.append(
                {
                    metric.STEP: step,
                    metric.VAL_LOSS: 1.0,
                    metric.VAL_ACC: eval_accs[step // 10],
                    metric.COMM_BYTES_CUM: payload * step,
                }
            )
    rows.insert(0, {metric.STEP: 0, metric.VAL_LOSS: 2.0, metric.VAL_ACC: eval_accs[0], metric.COMM_BYTES_CUM: 0})
    (path / metric.METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {
        metric.PARAMS: 1234,
        metric.WORLD_SIZE: 2,
        metric.STRATEGY: strategy,
        metric.STEPS: steps,
        metric.TASK: task,
        metric.ATTENTION: "fpsa",
        metric.COMM_RANK: rank,
        metric.SEED: seed,
        metric.FINAL_VAL_ACC: eval_accs[-1],
        metric.FINAL_VAL_LOSS: 1.0,
        metric.COMM_BYTES_TOTAL: payload * steps,
        metric.COMM_BYTES_PER_STEP: payload,
        metric.COMM_WIRE_BYTES_PER_STEP: wire,
        metric.COMM_ALLREDUCE_BYTES_PER_STEP: allreduce,
        metric.COMPRESSION_RATIO: allreduce / payload,
        metric.COMM_TIME_PER_STEP_S: comm_s,
        metric.TIME_STEP_S_MEAN: compute_s + comm_s,
        metric.TIME_COMPUTE_S_PER_STEP: compute_s,
        metric.WALL_S: steps * (compute_s + comm_s),
    }
    if iters_by_difficulty:
        summary[metric.EXAMPLE_ITERS_BY_DIFFICULTY] = iters_by_difficulty
    if iters_by_token_difficulty:
        summary[metric.TOKEN_ITERS_BY_DIFFICULTY] = iters_by_token_difficulty
        summary[metric.FINAL_TOKEN_ITERS_SLOPE] = 0.5
    (path / metric.SUMMARY_FILE).write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    # parity: allreduce over two seeds (final 0.9 and 0.8), powersgd r2 with 10x less payload (final 0.7).
    write_run(
        root / "allreduce-s0-w2",
        task="parity",
        strategy="allreduce",
        rank=4,
        seed=0,
        payload=1000,
        allreduce=1000,
        wire=1000,
        eval_accs=[0.5, 0.7, 0.85, 0.9],
        compute_s=0.1,
    )
    write_run(
        root / "allreduce-s1-w2",
        task="parity",
        strategy="allreduce",
        rank=4,
        seed=1,
        payload=1000,
        allreduce=1000,
        wire=1000,
        eval_accs=[0.5, 0.6, 0.75, 0.8],
        compute_s=0.2,
    )
    write_run(
        root / "powersgd-r2-s0-w2",
        task="parity",
        strategy="powersgd",
        rank=2,
        seed=0,
        payload=100,
        allreduce=1000,
        wire=100,
        eval_accs=[0.5, 0.6, 0.7, 0.7],
        compute_s=0.1,
    )
    write_run(
        root / "powersgd-r2-s1-w2",
        task="parity",
        strategy="powersgd",
        rank=2,
        seed=1,
        payload=100,
        allreduce=1000,
        wire=100,
        eval_accs=[0.5, 0.55, 0.6, 0.7],
        compute_s=0.1,
    )
    # listops: one run with FPSA iterations by nesting depth
    write_run(
        root / "nested" / "dad-s0-w2",
        task="listops",
        strategy="dad",
        rank=4,
        seed=0,
        payload=500,
        allreduce=1000,
        wire=500,
        eval_accs=[0.2, 0.4],
        compute_s=0.5,
        iters_by_difficulty={"1": 3.0, "2": 4.5, "3": 7.0},
        iters_by_token_difficulty={"0": 2.0, "1": 2.5, "2": 3.0, "3": 3.5},
    )
    # the same configuration measured by a sweep on a shaped link: a row of its own
    write_run(
        root / "dad-s0-w2-10mbit",
        task="listops",
        strategy="dad",
        rank=4,
        seed=0,
        payload=500,
        allreduce=1000,
        wire=500,
        eval_accs=[0.2, 0.3],
        compute_s=0.5,
        comm_s=0.4,
    )
    (root / "dad-s0-w2-10mbit" / "sweep.json").write_text(json.dumps({"strategy": "dad", "link_rate": "10mbit"}))
    # crashed runs: one never finished, one wrote a summary without the communication figures
    crashed = root / "rankdad-r2-s0-w2"
    crashed.mkdir()
    (crashed / "config.yaml").write_text("comm:\n  strategy: rankdad\n")
    (crashed / "train.log").write_text("Traceback ...\n")
    truncated = root / "ddp-s0-w2"
    truncated.mkdir()
    (truncated / metric.SUMMARY_FILE).write_text(json.dumps({metric.TASK: "parity", metric.STRATEGY: "ddp"}))
    return root


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def build(sweep_dir: Path, out: Path, target_acc: float | None = None) -> Report:
    return make_report([str(sweep_dir)], out, target_acc, parse_link_rates(RATES.split(",")), log_wandb=False)


@pytest.fixture(scope="module")
def report(sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return build(sweep_dir, tmp_path_factory.mktemp("report"))


def table_for(report: Report, task: str) -> TaskTable:
    (table,) = [t for t in report.tables if t.task == task]
    return table


def row_for(table: TaskTable, strategy: str, link_rate: str | None = None) -> Row:
    (row,) = [r for r in table.rows if r.strategy == strategy and r.link_rate == link_rate]
    return row


def test_link_rates_parse_as_bits_per_second() -> None:
    assert parse_link_rate("100mbit") == LinkRate("100mbit", 1e8)
    assert parse_link_rate("1gbit").bytes_per_s == 1.25e8
    assert parse_link_rate("2.5kbit").bits_per_s == 2500.0
    for bad in ("100mbps", "fast", "0mbit", "-1gbit"):
        with pytest.raises(ConfigError, match="link rate"):
            parse_link_rate(bad)


def test_time_model() -> None:
    rows = [
        {metric.STEP: 0, metric.VAL_ACC: 0.1},
        {metric.STEP: 20, metric.VAL_ACC: 0.8},
        {metric.STEP: 10, metric.VAL_ACC: 0.5},
    ]
    assert steps_to_target(rows, 0.5) == 10
    assert steps_to_target(rows, 0.9) is None
    # 10 steps x (0.5 s compute + 2000 bytes / 1000 bytes/s)
    assert time_to_target(10, 0.5, 2000, LinkRate("8kbit", 8000)) == pytest.approx(25.0)


def test_grouping_and_figures(report: Report) -> None:
    parity = table_for(report, "parity")
    assert [r.strategy for r in parity.rows] == ["allreduce", "powersgd"]  # STRATEGIES order
    allreduce, powersgd = row_for(parity, "allreduce"), row_for(parity, "powersgd")
    assert [run.seed for run in allreduce.runs] == [0, 1]
    assert allreduce.rank is None and powersgd.rank == 2  # comm.rank means nothing to an exact strategy
    assert allreduce.compression_ratio == pytest.approx(1.0)
    assert powersgd.compression_ratio == pytest.approx(10.0)
    assert powersgd.payload_bytes_per_step == 100 and powersgd.wire_bytes_per_step == 100
    assert allreduce.acc_mean == pytest.approx(0.85)
    assert allreduce.acc_std == pytest.approx(math.sqrt(0.005))  # sample std of 0.9 and 0.8
    assert powersgd.acc_std == pytest.approx(0.0)
    assert allreduce.compute_s_per_step == pytest.approx(0.15)
    assert allreduce.step_s == pytest.approx(0.16)


def test_default_target_and_steps_to_it(report: Report) -> None:
    parity = table_for(report, "parity")
    assert parity.target_acc == pytest.approx(0.9 * 0.85)  # 90% of allreduce's mean final accuracy
    allreduce, powersgd = row_for(parity, "allreduce"), row_for(parity, "powersgd")
    # 0.765 is first reached at step 20 by seed 0 (0.85) and at step 30 by seed 1 (0.8)
    assert allreduce.steps_to_target == pytest.approx(25.0) and allreduce.reached == 2
    assert powersgd.steps_to_target is None and powersgd.reached == 0
    assert table_for(report, "listops").target_acc == pytest.approx(0.36)


def test_time_to_target_under_the_model(report: Report) -> None:
    allreduce = row_for(table_for(report, "parity"), "allreduce")
    # seed 0: 20 x (0.1 + 1000/1000) = 22 s, seed 1: 30 x (0.2 + 1) = 36 s at 8 kbit/s = 1000 B/s
    assert allreduce.time_to_target_s["8kbit"] == pytest.approx(29.0)
    # at 1 mbit/s = 125 000 B/s: 20 x 0.108 = 2.16 s and 30 x 0.208 = 6.24 s
    assert allreduce.time_to_target_s["1mbit"] == pytest.approx(4.2)
    # as run: 20 steps x 0.11 s and 30 steps x 0.21 s
    assert allreduce.measured_time_to_target_s == pytest.approx(4.25)
    assert row_for(table_for(report, "parity"), "powersgd").time_to_target_s == {"8kbit": None, "1mbit": None}


def test_given_target_counts_the_seeds_that_reach_it(sweep_dir: Path, tmp_path: Path) -> None:
    report = build(sweep_dir, tmp_path, target_acc=0.65)
    powersgd = row_for(table_for(report, "parity"), "powersgd")
    assert powersgd.steps_to_target == pytest.approx(25.0)  # seed 0 at step 20 (0.7), seed 1 at step 30
    listops = row_for(table_for(report, "listops"), "dad")
    assert listops.steps_to_target is None and listops.reached == 0
    text = report.path.read_text()
    assert "given with --target-acc" in text
    assert "| not reached |" in text


def test_markdown_states_figures_model_and_target(report: Report) -> None:
    text = report.path.read_text()
    assert "0.8500 ± 0.0707" in text and "10.00×" in text and "1.00×" in text
    assert "| 25 |" in text and "| 4.25 s | 29 s | 4.2 s |" in text
    assert "steps to target × (compute s/step + wire bytes/step ÷ link rate)" in text
    assert "0.7650 (90% of the best mean final accuracy in this task, 0.8500)" in text
    assert "8kbit = 1 kB/s" in text and "1mbit = 125 kB/s" in text
    assert "## Task: listops" in text and "## Task: parity" in text


def test_incomplete_runs_are_skipped_with_the_reason(report: Report, sweep_dir: Path) -> None:
    reasons = {skip.path.name: skip.reason for skip in report.skipped}
    assert reasons["rankdad-r2-s0-w2"] == "no summary.json (the run did not finish)"
    assert reasons["ddp-s0-w2"].startswith("summary.json lacks ") and metric.FINAL_VAL_ACC in reasons["ddp-s0-w2"]
    text = report.path.read_text()
    assert "## Skipped runs" in text
    assert f"(log: `{sweep_dir / 'rankdad-r2-s0-w2' / 'train.log'}`)" in text
    assert sum(len(t.rows) for t in report.tables) == 4


def test_runs_on_shaped_links_are_rows_of_their_own(report: Report) -> None:
    listops = table_for(report, "listops")
    assert [(r.strategy, r.link_rate) for r in listops.rows] == [("dad", None), ("dad", "10mbit")]
    assert row_for(listops, "dad", "10mbit").comm_s_per_step == pytest.approx(0.4)
    text = report.path.read_text()
    assert "| strategy | rank | world size | link |" in text  # only listops has the link column
    assert "| dad | — | 2 | 10mbit | 1 |" in text and "| dad | — | 2 | local | 1 |" in text


def test_non_finite_values_are_read_back_as_floats(tmp_path: Path) -> None:
    write_run(
        tmp_path / "run",
        task="parity",
        strategy="ddp",
        rank=4,
        seed=0,
        payload=1,
        allreduce=1,
        wire=1,
        eval_accs=[0.5, 0.6],
        compute_s=0.1,
    )
    with (tmp_path / "run" / metric.METRICS_FILE).open("a") as metrics:  # how the trainer writes NaN and Inf
        metrics.write(
            json.dumps({metric.STEP: 11, metric.TRAIN_LOSS: "nan", metric.GRAD_NORM: "inf", metric.COMM_BYTES_CUM: 11})
            + "\n"
        )
    loaded = load_run(tmp_path / "run")
    last = loaded.train_rows[-1]
    assert math.isnan(last[metric.TRAIN_LOSS]) and last[metric.GRAD_NORM] == math.inf


def test_plots_are_embedded_real_pngs(report: Report) -> None:
    out = report.path.parent
    expected = {f"parity_{name}.png" for name in ("accuracy_vs_bytes", "loss_vs_step", "time_to_target")}
    # only listops has FPSA iterations by difficulty (per example and per token); both tasks reach their targets
    expected |= {
        f"listops_{name}.png"
        for name in ("accuracy_vs_bytes", "loss_vs_step", "time_to_target", "fpsa_iterations", "fpsa_token_iterations")
    }
    assert {p.name for p in out.glob("*.png")} == expected
    text = report.path.read_text()
    for name in expected:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels[..., :3].std() > 0.05  # drawn lines and text, not a blank canvas
        assert f"]({name})" in text
    assert "![FPSA iterations per token vs per-token difficulty (fixed sequence length)](listops_fpsa_token" in text


def test_the_per_token_plot_draws_the_mean_over_seeds_by_token_difficulty(tmp_path: Path) -> None:
    from dtrain.report.plots import token_iterations_by_difficulty

    common = dict(task="s5", strategy="allreduce", rank=4, payload=1.0, allreduce=1.0, wire=1.0, compute_s=0.1)
    write_run(tmp_path / "s0", seed=0, eval_accs=[0.1, 0.2], iters_by_token_difficulty={"0": 2.0, "1": 4.0}, **common)
    write_run(tmp_path / "s1", seed=1, eval_accs=[0.1, 0.3], iters_by_token_difficulty={"0": 3.0, "2": 5.0}, **common)
    report = make_report([str(tmp_path)], tmp_path / "out", None, parse_link_rates(["10mbit"]), log_wandb=False)
    (row,) = report.tables[0].rows
    assert token_iterations_by_difficulty(row) == {0.0: 2.5, 1.0: 4.0, 2.0: 5.0}
    assert (tmp_path / "out" / "s5_fpsa_token_iterations.png").is_file()
    assert not (tmp_path / "out" / "s5_fpsa_iterations.png").exists()  # no per-example figures in these runs


def test_cli_logs_to_offline_wandb(sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert run(parse([str(sweep_dir), "--out", str(out), "--link-rates", RATES])) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    assert "skipped" in printed and "rankdad-r2-s0-w2" in printed
    from dtrain.report.wandb_log import TOKEN_ITERS_KEY
    from tests.helpers.wandb_files import written

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0
    assert written(run_file, [TOKEN_ITERS_KEY]) == []  # listops' per-token points, as a table
    assert "wandb (offline)" in printed


def test_bad_input_is_a_config_error(sweep_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run directory not found"):
        run(parse([str(tmp_path / "missing"), "--wandb", "disabled"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run directories in"):
        run(parse([str(tmp_path / "empty"), "--wandb", "disabled"]))
    with pytest.raises(ConfigError, match="no complete runs to report .*did not finish"):
        run(parse([str(sweep_dir / "rankdad-r2-s0-w2"), "--wandb", "disabled", "--out", str(tmp_path / "r")]))
    with pytest.raises(ConfigError, match="link rate"):
        run(parse([str(sweep_dir), "--link-rates", "10mbps", "--wandb", "disabled"]))
    with pytest.raises(ConfigError, match="target-acc"):
        run(parse([str(sweep_dir), "--target-acc", "85", "--wandb", "disabled", "--out", str(tmp_path / "r")]))

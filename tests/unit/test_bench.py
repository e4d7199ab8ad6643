"""Smoke tests of the benchmark scripts in this process: every bench.NAME imports and prints its help, the
in-process ones run at a tiny size and produce their table, and their pure helpers compute what they say.

The real benchmarks take minutes to an hour and are not part of any test suite; tests/distributed/test_bench.py
runs the scripts that launch processes (`python -m bench.NAME`) at a tiny size."""

from __future__ import annotations

import importlib
import sys
import time

import pytest
import torch

from tests.helpers.launch import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def _run_main(name: str, argv: list[str], monkeypatch) -> None:
    """bench.NAME's main() in this process, with the argv that `python -m bench.NAME ARGV` would give it."""
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), *argv])
    module.main()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_as_a_module_and_prints_its_help(name, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_main(name, ["--help"], monkeypatch)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_recorded_command_line_runs_the_module():
    from bench._common import command_line

    argv = [str(BENCH / "overlap.py"), "--docs", "docs/benchmarks.md", "--set", "a b"]
    assert command_line(argv) == ".venv/bin/python -m bench.overlap --docs docs/benchmarks.md --set 'a b'"


def test_fpsa_step_time_tiny(monkeypatch, capsys, tmp_path):
    docs = tmp_path / "benchmarks.md"
    _run_main("fpsa_step_time", ["--tiny", "--docs", str(docs)], monkeypatch)
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "fpsa phantom n=3" in out
    assert docs.read_text().count("## FPSA step time vs vanilla") == 1
    assert "Command: `.venv/bin/python -m bench.fpsa_step_time --tiny --docs " in docs.read_text()


def test_fpsa_gradient_check_and_adaptivity_on_a_tiny_checkpoint(monkeypatch, capsys, tmp_path):
    """Both read a run directory (config.yaml, model.pt): here an untrained S5 model, contractive at init."""
    from dtrain.config import Config, dump_config
    from dtrain.data import build_task
    from dtrain.model import build_model

    cfg = Config.model_validate(
        {
            "model": {"d_model": 8, "n_layers": 1, "n_heads": 2},
            "fpsa": {"max_iter": 12, "tol": 1e-6, "damping": 1.0},
            "data": {"task": "s5", "seq_len": 6, "n_val": 16},
            "train": {"batch_size": 8},
        }
    )
    torch.manual_seed(0)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    torch.save(build_model(cfg, build_task(cfg.data).spec).state_dict(), tmp_path / "model.pt")
    docs = tmp_path / "benchmarks.md"
    _run_main("fpsa_gradient_check", [str(tmp_path), "--docs", str(docs)], monkeypatch)
    assert "| implicit vs exact fixed point |" in capsys.readouterr().out
    _run_main("fpsa_adaptivity", [str(tmp_path), "--boot", "20", "--docs", str(docs)], monkeypatch)
    assert "| iterations ~ difficulty + position |" in capsys.readouterr().out
    # the step time at the checkpoint: the run's own tol, so the solve stops on its own (not at a forced count)
    _run_main("fpsa_step_time", ["--checkpoint", str(tmp_path), "--repeats", "1", "--docs", str(docs)], monkeypatch)
    out = capsys.readouterr().out
    assert "| fpsa implicit |" in out and "n=" not in out
    text = docs.read_text()
    assert "## FPSA implicit vs BPTT gradient" in text and "## FPSA iterations vs per-token difficulty" in text
    assert "## FPSA step time vs vanilla at a trained checkpoint" in text and "fpsa.tol 1e-06" in text

    # the bench's plain slope is the trainer's val/fpsa_token_iters_slope: one difficulty, one set of iterations
    from bench.fpsa_adaptivity import slopes, token_rows
    from dtrain.distributed import DistEnv
    from dtrain.trainer import evaluate

    iters, difficulty, position, _ = token_rows(tmp_path)
    model = build_model(cfg, build_task(cfg.data).spec)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    res = evaluate(model, build_task(cfg.data), cfg, env)
    assert res.token_iters_slope == pytest.approx(slopes(iters, difficulty, position)[0], rel=1e-9, abs=1e-12)


def test_rankdad_model_overhead_tiny(monkeypatch, capsys):
    _run_main("rankdad_model_overhead", ["--tiny"], monkeypatch)
    assert "| k1 EF bf16 |" in capsys.readouterr().out


def test_bytes_vs_accuracy_table_compares_each_seed_with_allreduce():
    from bench import bytes_vs_accuracy as b

    rows = [
        {
            "label": "allreduce",
            "seed": 0,
            "overrides": ["comm.strategy=allreduce"],
            "acc": 0.90,
            "bytes": 400.0,
            "ratio": 1.0,
            "world": 4,
            "wire": 600.0,
            "wire_ratio": 1.0,
        },
        {
            "label": "rankdad-k1",
            "seed": 0,
            "overrides": ["comm.strategy=rankdad"],
            "acc": 0.885,
            "bytes": 4.0,
            "ratio": 100.0,
            "world": 4,
            "wire": 12.0,
            "wire_ratio": 50.0,
        },
    ]
    text, agg = b.table(rows, ["allreduce", "rankdad-k1"])
    assert agg["rankdad-k1"]["delta"] == pytest.approx(-1.5)
    assert "| rankdad-k1 |" in text and "| no |" in text
    # wire bytes and the wire ratio, with the world size, beside the payload
    assert "wire/step per rank (S = 4)" in text and "| 12 B | 50.0× |" in text


def test_time_to_target_sums_step_times_up_to_the_first_eval_at_target():
    from bench import time_to_accuracy as t

    metrics = [
        {"step": 1, "time/step_s": 1.0},
        {"step": 2, "time/step_s": 2.0},
        {"step": 2, "val/acc": 0.5},
        {"step": 3, "time/step_s": 4.0},
        {"step": 3, "val/acc": 0.95},
    ]
    assert t.time_to_target(metrics, 0.9) == (3, 7.0)
    assert t.time_to_target(metrics, 0.99) == (None, None)
    assert t.rate_bits("100mbit") == 100e6


def test_wire_vs_world_table_shows_each_world_size_with_its_ratio():
    from bench import wire_vs_world as w

    rows = [
        {"label": "allreduce", "world": s, "payload": 400.0, "wire": 2 * (s - 1) / s * 400, "ratio": 1.0}
        for s in (2, 4)
    ] + [{"label": "dad", "world": s, "payload": 100.0, "wire": (s - 1) * 100.0, "ratio": 0} for s in (2, 4)]
    text = w.table(rows, [2, 4], ["allreduce", "dad"])
    assert "wire / rank at S = 4" in text and "| allreduce | 400 B | 400 B (1.0×) | 600 B (1.0×) |" in text


def test_bytes_vs_accuracy_table_at_world_size_1_has_no_wire_ratio():
    from bench import bytes_vs_accuracy as b

    row = {"label": "allreduce", "seed": 0, "overrides": [], "acc": 0.5, "bytes": 4.0, "ratio": 1.0}
    text, _ = b.table([{**row, "world": 1, "wire": 0.0, "wire_ratio": None}], ["allreduce"])
    assert "| 0 B | — |" in text


def test_gpu_check_refuses_the_docs_in_a_dry_run_and_a_machine_without_cuda(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _run_main("gpu_check", ["--dry-run", "--docs", str(tmp_path / "benchmarks.md")], monkeypatch)
    assert exit_info.value.code == 2 and "--docs with --dry-run" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        _run_main("gpu_check", ["--out", str(tmp_path)], monkeypatch)
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_timer_on_the_cpu_is_the_wall_clock():
    from bench._timing import Timer

    timer = Timer(torch.device("cpu"))
    assert timer.clock == "wall clock"
    assert 0.02 <= timer.median(lambda: time.sleep(0.02), repeats=3, warmup=1) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_timer_on_a_gpu_times_the_kernels_not_their_launch():
    """torch.cuda._sleep queues a kernel that spins for a number of GPU clock cycles and returns at once: 1e8
    cycles are 50 ms or more at any clock below 2 GHz, while the host call takes microseconds."""
    from bench._timing import Timer

    timer = Timer(torch.device("cuda"))
    assert timer.clock == "CUDA events"
    t0 = time.perf_counter()
    device_s = timer.seconds(lambda: torch.cuda._sleep(100_000_000))
    assert device_s >= 0.04 and time.perf_counter() - t0 >= device_s * 0.9

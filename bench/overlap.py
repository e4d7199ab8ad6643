"""Overlap of dAD / rank-dAD collectives with backward: when each layer's collective starts, and what it saves.

Two copies of the same model (same initial weights, same batches) train side by side in the same processes,
one with `comm.overlap=true` (each Linear layer's all-gather starts from the capture's Δ callback, during the
rest of backward) and one with `comm.overlap=false` (everything after backward, in `synchronize()`); the two
alternate step by step (ABBA order) so machine load hits both alike. Per step it records forward, backward,
synchronize and whole-step times, and per layer collective its launch and completion times relative to the end
of `loss.backward()`. At the end it checks that both copies hold bitwise the same weights (overlap must not
change a single bit).

    .venv/bin/python -m bench.overlap --docs docs/benchmarks.md          # ~3 min on 2 cores
    .venv/bin/python -m bench.overlap --tiny                             # seconds (smoke test)

The workers run under torchrun (2 processes, gloo over 127.0.0.1, `-m bench.overlap --worker`); this script
launches them itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, TORCHRUN, argument_parser, load, write_result
from dtrain.metrics import format_bytes

SECTION = "## Overlap of layer collectives with backward (issue 9)"
VARIANTS = (("overlap", True), ("after backward", False))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dtrain.compression import build_strategy
    from dtrain.config import load_config
    from dtrain.data import build_task
    from dtrain.model import build_model
    from dtrain.optim import build_optimizer
    from dtrain.trainer import loss_fn

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(ROOT / args.config, args.set)
    task = build_task(cfg.data)
    B = cfg.train.batch_size
    n = B // world
    out: dict[str, Any] = {"world": world, "strategies": {}}
    for strategy in args.strategies:
        runs = {}
        for label, overlap in VARIANTS:
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg, task.spec)
            comm = cfg.comm.model_copy(update={"strategy": strategy, "overlap": overlap, "rank": args.rank})
            strat = build_strategy(comm)
            fwd = strat.attach(model)
            opt = build_optimizer(cfg.train, model)
            runs[label] = {"model": model, "fwd": fwd, "strategy": strat, "opt": opt, "steps": []}
        for step in range(args.steps):
            order = list(VARIANTS) if step % 2 == 0 else list(reversed(VARIANTS))
            for label, _ in order:
                r = runs[label]
                b = task.batch("train", step * B + rank * n, n)
                dist.barrier()
                strat = r["strategy"]
                t0 = time.perf_counter()
                logits = r["fwd"](b.tokens, b.mask)
                loss = loss_fn(logits, b.targets, task.spec.targets_per_example)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                stats = strat.synchronize()
                t3 = time.perf_counter()
                r["opt"].step()
                r["opt"].zero_grad(set_to_none=True)
                t4 = time.perf_counter()
                # the scheduler's report of this step (empty when the step was not overlapped)
                trace = [
                    {
                        "layer": e.layer,
                        "launch_ms": 1e3 * (e.launched - t2),
                        "done_ms": 1e3 * ((e.done or t3) - t2),
                        "in_backward": e.in_backward,
                        "bytes": e.bytes,
                    }
                    for e in strat.scheduler.last_round.layers
                ]
                r["steps"].append(
                    {
                        "forward_ms": 1e3 * (t1 - t0),
                        "backward_ms": 1e3 * (t2 - t1),
                        "sync_ms": 1e3 * (t3 - t2),
                        "step_ms": 1e3 * (t4 - t0),
                        "comm_blocked_ms": 1e3 * stats.time_s,
                        "bytes": stats.bytes_sent,
                        "trace": trace,
                        "backward_start_ms": 1e3 * (t1 - t2),
                    }
                )
        a, b_ = (runs[label]["model"] for label, _ in VARIANTS)
        identical = all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b_.state_dict().values()))
        out["strategies"][strategy] = {
            "identical": identical,
            "runs": {label: runs[label]["steps"] for label, _ in VARIANTS},
        }
        for label, _ in VARIANTS:
            runs[label]["strategy"].close()
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.destroy_process_group()


def summarise(result: dict[str, Any], warmup: int) -> tuple[str, str]:
    med = statistics.median
    lines = [
        "| strategy | collectives | bytes/step | backward (ms) | synchronize (ms) | blocked in collectives (ms) "
        "| step (ms) | layers launched during backward | weights bitwise equal to the other mode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    timeline = []
    for strategy, res in result["strategies"].items():
        for label, steps in res["runs"].items():
            s = steps[warmup:] or steps
            launched = [sum(e["in_backward"] for e in st["trace"]) for st in s]
            n_layers = max((len(st["trace"]) for st in s), default=0)
            early = f"{med(launched):.0f} of {n_layers}" if label == "overlap" else "0 (by design)"
            lines.append(
                f"| {strategy} | {label} | {format_bytes(s[0]['bytes'])} | {med([x['backward_ms'] for x in s]):.1f} "
                f"| {med([x['sync_ms'] for x in s]):.1f} | {med([x['comm_blocked_ms'] for x in s]):.1f} "
                f"| {med([x['step_ms'] for x in s]):.1f} | {early} | {'yes' if res['identical'] else 'NO'} |"
            )
        s = res["runs"]["overlap"][warmup:] or res["runs"]["overlap"]
        layers = [e["layer"] for e in s[0]["trace"]]
        if layers:
            timeline.append(
                f"\n`{strategy}`, overlap on: per layer, in launch order, median over steps; times in ms "
                "relative to the end of `loss.backward()` (negative = during backward; backward started at "
                f'{med([x["backward_start_ms"] for x in s]):.1f} ms). "completed" is the first check '
                "that saw the collective done (at a later layer's launch, or in synchronize): an upper "
                "bound\n"
            )
            timeline.append("| layer | launched | completed | bytes sent |")
            timeline.append("|---|---|---|---|")
            for i, layer in enumerate(layers):
                ev = [st["trace"][i] for st in s if len(st["trace"]) > i]
                timeline.append(
                    f"| {layer} | {med([e['launch_ms'] for e in ev]):+.1f} | "
                    f"{med([e['done_ms'] for e in ev]):+.1f} | {ev[0]['bytes']:,} |"
                )
    return "\n".join(lines), "\n".join(timeline)


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--config", default="configs/bench/s5_d256.yaml")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--strategies", nargs="+", default=["dad", "rankdad"])
    ap.add_argument("--rank", type=int, default=4, help="comm.rank for rankdad")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny model, 3 steps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.config, args.steps, args.warmup = "tests/configs/tiny.yaml", 3, 1
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            str(args.nproc),
            "-m",
            __spec__.name,
            "--worker",
            "--result",
            str(result_path),
            "--config",
            args.config,
            "--steps",
            str(args.steps),
            "--rank",
            str(args.rank),
            "--strategies",
            *args.strategies,
        ]
        if args.set:
            cmd += ["--set", *args.set]
        load_before = load()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"overlap workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result = json.loads(result_path.read_text())
    loads = [load_before, load()]
    table, timeline = summarise(result, args.warmup)
    print(table)
    print(timeline)
    if args.docs:
        write_result(
            args.docs,
            SECTION,
            f"Model `{args.config}`{' with ' + ' '.join(args.set) if args.set else ''}, {result['world']} "
            f"processes (gloo over 127.0.0.1, no shaping), rankdad rank {args.rank}; {args.steps} steps per "
            f"mode, the two modes interleaved in the same processes (ABBA), medians over steps after "
            f"{args.warmup} warm-up steps.",
            loads,
            table,
            timeline,
        )


if __name__ == "__main__":
    main()

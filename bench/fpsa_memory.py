"""Peak memory of one FPSA training step (forward + backward) against the number of solver iterations.

The implicit backward keeps only one differentiable step, so its memory should not depend on fpsa.max_iter;
BPTT keeps every iteration. Every token is forced to run all iterations (fpsa.tol far below reach). Two
measurements per configuration, each in a fresh subprocess:
- saved: bytes of the distinct storages autograd saved for backward during the forward
  (torch.autograd.graph.saved_tensors_hooks), i.e. what the graph holds when backward starts;
- RSS: the process's peak resident set (ru_maxrss) over the step, minus its resident set just before it. This
  also covers the forward solve's temporaries and the adjoint solve that runs inside backward.

    .venv/bin/python -m bench.fpsa_memory [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench._common import ROOT, command_line, machine, write_section
from dtrain import metrics
from dtrain.config import Config
from dtrain.data import build_task
from dtrain.model import build_model
from dtrain.trainer import loss_fn

SECTION = "## FPSA memory"
RUNS = [("implicit", 4), ("implicit", 32), ("bptt", 4), ("bptt", 32)]
SHAPE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 128, "batch": 16}
MIB = 2**20
# glibc then serves every allocation above 64 KiB with its own mmap and unmaps it on free, so the RSS high-water
# mark follows the live tensors instead of what the allocator keeps cached (without it, runs vary by +-10 MiB)
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def make_step(backward: str, max_iter: int):
    cfg = Config.model_validate(
        {
            "model": {
                "attention": "fpsa",
                "d_model": SHAPE["d_model"],
                "n_layers": SHAPE["n_layers"],
                "n_heads": SHAPE["n_heads"],
            },
            "fpsa": {"backward": backward, "max_iter": max_iter, "tol": 1e-30},
            "data": {"task": "parity", "seq_len": SHAPE["seq_len"]},
        }
    )
    task = build_task(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, task.spec)
    batch = task.batch("train", 0, SHAPE["batch"])

    def step(rows: int = SHAPE["batch"]) -> torch.Tensor:
        logits = model(batch.tokens[:rows], batch.mask[:rows])
        return loss_fn(logits, batch.targets[:rows], task.spec.targets_per_example)

    return model, step


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `forward()` builds its loss (then
    backpropagated, so the graph is freed as in a training step)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(storages.values())


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(backward: str, max_iter: int) -> dict[str, float]:
    """Runs in the child process."""
    torch.set_num_threads(1)
    model, step = make_step(backward, max_iter)
    step(rows=1).backward()  # one-time costs (kernel and allocator set-up) stay out of the step's increase
    model.zero_grad()
    before = current_rss()
    step().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    loops = [model.fpsa_stats()[metrics.FPSA_LOOP_LAYER.format(layer=i)] for i in range(SHAPE["n_layers"])]
    model.zero_grad()
    return {
        "saved_mib": saved_bytes(step) / MIB,
        "rss_step_mib": (peak - before) / MIB,
        "rss_peak_mib": peak / MIB,
        "loop_iters": min(loops),
    }


def table(results: list[tuple[str, int, dict[str, float]]]) -> str:
    by = {(b, n): r for b, n, r in results}
    lines = [
        "| backward | max_iter | iterations run | saved for backward (MiB) | step peak RSS increase (MiB) "
        "| process peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for b, n, r in results:
        lines.append(
            f"| {b} | {n} | {r['loop_iters']:.0f} | {r['saved_mib']:.2f} | {r['rss_step_mib']:.1f} "
            f"| {r['rss_peak_mib']:.0f} |"
        )
    ratios = []
    for b in ("implicit", "bptt"):
        lo, hi = by[(b, 4)], by[(b, 32)]
        ratios.append(
            f"- {b}, max_iter 32 / 4: saved {hi['saved_mib'] / lo['saved_mib']:.2f}x, "
            f"step peak RSS increase {hi['rss_step_mib'] / lo['rss_step_mib']:.2f}x"
        )
    return "\n".join(lines) + "\n\nRatios (target for implicit: < 1.2):\n\n" + "\n".join(ratios) + "\n"


def section(results: list[tuple[str, int, dict[str, float]]]) -> str:
    s = SHAPE
    return (
        f"{SECTION}\n\n"
        "One training step (forward + backward, no optimizer) of the SELF-Transformer with fixed-point "
        "attention, every token forced through all `fpsa.max_iter` iterations (`fpsa.tol=1e-30`). "
        f"Model d_model={s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads; parity task, batch "
        f'{s["batch"]} x {s["seq_len"]} tokens, float32. Each row is a fresh process. "Saved for backward" '
        "counts the distinct storages autograd saved during the forward (`saved_tensors_hooks`); the RSS "
        "columns are `ru_maxrss` after the step minus the resident set just before it (after a one-example "
        "warm-up step, so one-time set-up costs are excluded; glibc's `MALLOC_MMAP_THRESHOLD_=65536` so "
        "freed tensors leave the resident set), and the absolute peak (it includes the "
        "interpreter and torch).\n\n"
        f"Machine: {machine()}, 1 intra-op thread.\n\n"
        f"Command: `{command_line()}`\n\n" + table(results)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, help="write the table into this markdown file's FPSA memory section")
    parser.add_argument("--child", nargs=2, metavar=("BACKWARD", "MAX_ITER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    results = []
    for backward, max_iter in RUNS:
        out = subprocess.run(
            [sys.executable, "-m", __spec__.name, "--child", backward, str(max_iter)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=CHILD_ENV,
        ).stdout
        results.append((backward, max_iter, json.loads(out.strip().splitlines()[-1])))
    text = section(results)
    print(text)
    if args.docs:
        write_section(args.docs, text)


if __name__ == "__main__":
    main()

"""FPSA host syncs and training steps/s, before and after the solver stopped reading its exit condition every
iteration (issue 14, item 6), side by side in one process.

"Before" is dtrain/model/ as it was at commit `--baseline`, "after" as it was at commit `--after`, the commit that
made the change (the solver has changed since, issue 16, so the working tree would measure that too). Each is read
with `git show` and imported as a separate package, with dtrain/metrics.py of the same commit (the metric names
have changed since); config and the trainer's loss are today's. Both models start from the same parameters and take
the same steps on the same batches: one step = forward + loss (the trainer's `loss_fn`) + backward + AdamW step +
`model.fpsa_stats()` (which the trainer logs every step), for one rank's share of the batch, on one process. The
two alternate step by step, in alternating order, so machine load hits both alike; the figures are medians over the
rounds, the ratio the median of the per-round ratios. After every round the two models' parameters and fpsa/*
statistics are compared bitwise. One extra (untimed) round counts each model's host syncs with
dtrain.syncs.count_syncs (forward, backward and fpsa_stats; the optimizer's own per-parameter step counters live on
the CPU by design and are left out).

    .venv/bin/python -m bench.fpsa_host_syncs --docs docs/benchmarks.md     # a few minutes on 1 core
    .venv/bin/python -m bench.fpsa_host_syncs --tiny                        # seconds (smoke test)
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench._common import ROOT, argument_parser, load, write_result
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.optim import build_optimizer
from dtrain.syncs import count_syncs
from dtrain.trainer import loss_fn

SECTION = "## FPSA host syncs: steps/s before and after (issue 14)"
#: the last commit whose solver read its exit condition after every iteration
BASELINE = "8be2bc4"
#: the commit that made the solver read it on a learnt schedule
AFTER = "b7b5cb3"
CASES = ["configs/quickstart.yaml", "configs/bench/s5_d256.yaml"]
NOTES = (
    "Reading: 'before' read the exit condition after every solver and adjoint iteration (`bool(active.any())`), "
    "then three figures per adjoint solve and two per layer in `fpsa_stats()`; 'after' reads it about once per "
    "solve (`dtrain/model/solver.py`, ExitSchedule) and all fpsa/* figures in one read, so the count no longer "
    "grows with the iterations (a 2-layer implicit model whose tokens never stop, forward + backward + "
    "fpsa_stats: 46 → 5 syncs at max_iter 8 and 142 → 5 at max_iter 32 from the second step on; the first step, "
    "which learns the count, makes 13 and 25; tests/unit/test_host_syncs.py). The training itself is bitwise "
    "unchanged (last column). On a CPU a host sync "
    "costs no more than any small operation, so steps/s do not move beyond noise and the few iterations run after "
    "the last token stopped (when a solve needs fewer than the ones before it) can cost a little; the saving is "
    "for CUDA, where each sync drains the queue of launched kernels, and is not measured here. The "
    "per-round ratio is the figure to read: the models train during the run, so their step times drift and the "
    "two separate medians can disagree with it."
)


def model_package_at(rev: str) -> ModuleType:
    """dtrain/model/ at git revision `rev`, imported as its own package (its relative imports stay inside it),
    with that revision's dtrain/metrics.py inside it in place of `from dtrain import metrics`."""
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "dtrain/model/"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    name = f"dtrain_model_{rev}"
    if name in sys.modules:
        return sys.modules[name]
    package = Path(tempfile.mkdtemp(prefix="fpsa_baseline_")) / name
    package.mkdir()
    for path in [p for p in listing if p.endswith(".py")] + ["dtrain/metrics.py"]:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, check=True).stdout
        (package / Path(path).name).write_bytes(text.replace(b"from dtrain import metrics", b"from . import metrics"))
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_pair(
    config: str, overrides: list[str], baseline: ModuleType, changed: ModuleType
) -> tuple[Any, Any, dict[str, tuple]]:
    cfg = load_config(ROOT / config, overrides)
    task = build_task(cfg.data)
    torch.manual_seed(cfg.train.seed)
    after = changed.build_model(cfg, task.spec)
    before = baseline.build_model(cfg, task.spec)
    before.load_state_dict(after.state_dict())
    models = {"before": before, "after": after}
    return cfg, task, {k: (m, build_optimizer(cfg.train, m)) for k, m in models.items()}


def train_step(model, opt, task, batch) -> tuple[tuple[float, float], dict[str, float]]:
    """One step; returns (wall seconds, this thread's CPU seconds) and the fpsa/* statistics."""
    t0, c0 = time.perf_counter(), time.thread_time()
    logits = model(batch.tokens, batch.mask)
    loss = loss_fn(logits, batch.targets, task.spec.targets_per_example)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = model.fpsa_stats()
    return (time.perf_counter() - t0, time.thread_time() - c0), stats


def same_bits(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype
        and torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8))
        for k in sa
    )


def run_case(
    config: str, overrides: list[str], baseline: ModuleType, changed: ModuleType, batch: int | None, repeats: int
) -> dict:
    cfg, task, pair = make_pair(config, overrides, baseline, changed)
    n = batch or max(1, cfg.train.batch_size // 2)
    batches = [task.batch("train", i * n, n) for i in range(8)]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in pair}
    identical = True
    for r in range(repeats + 3):  # three warm-up rounds
        order = list(pair) if r % 2 == 0 else list(pair)[::-1]
        stats = {}
        for name in order:
            model, opt = pair[name]
            t, stats[name] = train_step(model, opt, task, batches[r % len(batches)])
            if r >= 3:
                times[name].append(t)
        identical &= stats["before"] == stats["after"] and same_bits(pair["before"][0], pair["after"][0])
    syncs = {}
    for name, (model, opt) in pair.items():  # one more step each, counted (its time is not used)
        with count_syncs() as counter:
            logits = model(batches[0].tokens, batches[0].mask)
            loss_fn(logits, batches[0].targets, task.spec.targets_per_example).backward()
            stats[name] = model.fpsa_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        syncs[name] = counter.total
    identical &= stats["before"] == stats["after"] and same_bits(pair["before"][0], pair["after"][0])
    med = statistics.median
    wall = {k: [t[0] for t in v] for k, v in times.items()}
    cpu = {k: [t[1] for t in v] for k, v in times.items()}
    return {
        "cfg": cfg,
        "batch": n,
        "steps_s": {k: 1.0 / med(v) for k, v in wall.items()},
        # after steps/s over before steps/s, per round; and the same from CPU time (less sensitive to other load)
        "ratio": med([b / a for a, b in zip(wall["after"], wall["before"])]),
        "cpu_ratio": med([b / a for a, b in zip(cpu["after"], cpu["before"])]),
        "syncs": syncs,
        "identical": identical,
        "stats": stats["after"],
    }


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument(
        "--cases",
        nargs="+",
        default=CASES,
        help="configs, each optionally with overrides: configs/quickstart.yaml:fpsa.tol=0.02,fpsa.max_iter=20",
    )
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every case")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the 'before' dtrain/model/")
    ap.add_argument("--after", default=AFTER, help="git revision of the 'after' dtrain/model/")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default: batch_size / 2)")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.cases, args.repeats = ["tests/configs/tiny.yaml"], 2
    torch.set_num_threads(args.threads)
    baseline, changed = model_package_at(args.baseline), model_package_at(args.after)

    lines = [
        "| case | examples × tokens per step | solver; adjoint iterations per layer (last step) | host syncs per step, "
        "before → after | steps/s before | steps/s after | after / before (median of per-round ratios) "
        "| the same from CPU time | parameters and fpsa/* bitwise equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    loads = [load()]
    for case in args.cases:
        config, _, extra = case.partition(":")
        overrides = [*args.set, *(e for e in extra.split(",") if e)]
        res = run_case(config, overrides, baseline, changed, args.batch, args.repeats)
        loops = [v for k, v in res["stats"].items() if k.startswith("fpsa/loop_l")]
        adj = [v for k, v in res["stats"].items() if k.startswith("fpsa/adj_iters_l")]
        iters = ", ".join(f"{v:.0f}" for v in loops) + "; " + (", ".join(f"{v:.0f}" for v in adj) if adj else "—")
        label = f"`{config}`" + (f" `{extra}`" if extra else "")
        lines.append(
            f"| {label} ({res['cfg'].fpsa.backward}) | {res['batch']} × {res['cfg'].data.seq_len} | {iters} "
            f"| {res['syncs']['before']} → {res['syncs']['after']} | {res['steps_s']['before']:.1f} "
            f"| {res['steps_s']['after']:.1f} | {res['ratio']:.3f} | {res['cpu_ratio']:.3f} "
            f"| {'yes' if res['identical'] else 'NO'} |"
        )
        print(lines[-1], flush=True)
    loads.append(load())
    table = "\n".join(lines)
    print(table)
    if args.docs:
        write_result(
            args.docs,
            SECTION,
            f"One process, {args.threads} thread(s), {args.repeats} timed rounds after 3 warm-up rounds; 'before' is "
            f"dtrain/model/ at commit {args.baseline}, 'after' at commit {args.after} (see the module doc of "
            "`bench/fpsa_host_syncs.py`). Host syncs are counted by `dtrain.syncs.count_syncs` over one step's "
            "forward, backward and `fpsa_stats()`.",
            loads,
            table,
            "",
            NOTES,
        )


if __name__ == "__main__":
    main()

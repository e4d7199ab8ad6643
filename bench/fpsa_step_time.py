"""FPSA training-step time against vanilla attention, same model, same batch, interleaved in one process.

One training step = forward + loss + backward + AdamW step, for one rank's share of the batch (no
communication: this isolates the model's cost). The vanilla model and FPSA models with the solver forced to
run exactly n iterations (`fpsa.tol=1e-30`, `fpsa.max_iter=n`) take turns step by step, in a rotating order,
so machine load hits all alike; the figure is the median step time over repeats, and the ratio FPSA / vanilla
is taken per repeat round and then medianed. `--profile` prints torch.profiler's top operators of one FPSA
step.

    .venv/bin/python -m bench.fpsa_step_time --docs docs/benchmarks.md        # ~2 min on 1 core
    .venv/bin/python -m bench.fpsa_step_time --tiny                           # seconds (smoke test)
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path
from typing import Any

import torch

from bench._common import CPU, ROOT, argument_parser, load, write_result
from bench._timing import Timer
from dtrain import metrics
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.model import build_model
from dtrain.optim import build_optimizer
from dtrain.trainer import loss_fn

SECTION = "## FPSA step time vs vanilla (issue 9)"
SECTION_TRAINED = "## FPSA step time vs vanilla at a trained checkpoint (issue 16)"
TARGET = 1.6


def make(
    config: str, overrides: list[str], device: torch.device = CPU, state: dict | None = None
) -> tuple[Any, Any, Any, Any]:
    cfg = load_config(ROOT / config, overrides)
    task = build_task(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, task.spec)
    if state is not None:  # vanilla and FPSA attention have the same parameters, so one checkpoint fits both
        model.load_state_dict(state)
    model = model.to(device)
    return cfg, task, model, build_optimizer(cfg.train, model)


def make_variants(
    config: str,
    sets: list[str],
    backwards: list[str],
    iters: list[int] | None,
    device: torch.device = CPU,
    state: dict | None = None,
) -> dict[str, tuple]:
    """The vanilla model, then one FPSA model per (backward spec, forced iteration count n): name -> `make`'s tuple.
    A backward spec is an `fpsa.backward` mode, optionally with extra fpsa keys: implicit:fpsa.adj_max_iter=6.
    `iters` None: one FPSA model per spec, the solver stopping at the config's own fpsa.tol (from `state`, a
    trained checkpoint, that is the iteration count training really pays)."""
    variants: dict[str, tuple] = {"vanilla": make(config, [*sets, "model.attention=vanilla"], device, state)}
    for spec in backwards:
        backward, _, extra = spec.partition(":")
        extra_sets = [e for e in extra.split(",") if e]
        tag = f" ({', '.join(e.replace('fpsa.', '') for e in extra_sets)})" if extra_sets else ""
        for n in iters or [None]:
            force = [] if n is None else [f"fpsa.max_iter={n}", "fpsa.tol=1e-30"]
            label = "" if n is None else f" n={n}"
            variants[f"fpsa {backward}{label}{tag}"] = make(
                config,
                [*sets, "model.attention=fpsa", f"fpsa.backward={backward}", *force, *extra_sets],
                device,
                state,
            )
    return variants


def train_step(task, model, opt, batch) -> None:
    logits = model(batch.tokens, batch.mask)
    loss = loss_fn(logits, batch.targets, task.spec.targets_per_example)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_rounds(
    variants: dict[str, tuple], batches: list[Any], repeats: int, timer: Timer, reset: dict | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Every variant's step, `repeats` rounds after two warm-up rounds, in an order rotating by round (so machine
    load hits all alike). Returns per variant its step times (s), and its mean solver and adjoint iterations.
    `reset`: parameters loaded into every model before each step, outside the timing (a checkpoint stays the
    checkpoint instead of drifting with the timed optimizer steps)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    iters: dict[str, list[float]] = {n: [] for n in names}
    adj_iters: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 2):  # two warm-up rounds
        rot = names[r % len(names) :] + names[: r % len(names)]
        for name in rot:
            _, task, model, opt = variants[name]
            batch = batches[r % len(batches)]
            if reset is not None:
                model.load_state_dict(reset)
            t = timer.seconds(functools.partial(train_step, task, model, opt, batch))
            if r >= 2:
                times[name].append(t)
                stats = model.fpsa_stats() if hasattr(model, "fpsa_stats") else {}
                if stats:
                    iters[name].append(stats[metrics.FPSA_ITERS_MEAN])
                    adj = [v for k, v in stats.items() if k.startswith(metrics.FPSA_ADJ_ITERS_LAYER.split("{")[0])]
                    if adj:
                        adj_iters[name].append(sum(adj) / len(adj))
    return times, iters, adj_iters


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--config", default="configs/bench/s5_d256.yaml")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--iters", nargs="+", type=int, default=[3, 4, 6], help="forced FPSA iteration counts")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="a run directory: its config.yaml and model.pt for every model, reloaded before each step, and the "
        "solver stops at the run's own fpsa.tol instead of a forced count (the iterations a trained model needs; "
        "--iters is not used)",
    )
    ap.add_argument(
        "--backwards",
        nargs="+",
        default=["phantom", "implicit", "implicit:fpsa.adj_max_iter=6"],
        help="fpsa.backward modes, each optionally with extra fpsa keys: implicit:fpsa.adj_max_iter=6",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="examples per step (default: batch_size / 2, one rank's share on 2 ranks)",
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.config, args.repeats, args.iters, args.backwards = "tests/configs/tiny.yaml", 2, [3], ["phantom"]
    torch.set_num_threads(args.threads)

    state = None
    if args.checkpoint:
        run = args.checkpoint.resolve()
        args.config = str(run / "config.yaml")
        state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    variants = make_variants(args.config, args.set, args.backwards, None if state else args.iters, state=state)
    cfg0, task0 = variants["vanilla"][0], variants["vanilla"][1]
    batch_size = args.batch or max(1, cfg0.train.batch_size // 2)
    batches = [task0.batch("train", i * batch_size, batch_size) for i in range(4)]

    names = list(variants)
    loads = [load()]
    times, iters, adj_iters = run_rounds(variants, batches, args.repeats, Timer(CPU), reset=state)
    loads.append(load())

    med = statistics.median
    base = times["vanilla"]
    lines = [
        "| model | solver iterations (mean per token) | adjoint iterations (implicit) | step time median (ms) "
        "| FPSA / vanilla (median of per-round ratios) | target ≤ 1.6× |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        ratio = med([a / b for a, b in zip(times[name], base)])
        it = f"{med(iters[name]):.1f}" if iters[name] else "—"
        ok = "—" if name == "vanilla" else "met" if ratio <= TARGET else f"not met (+{100 * (ratio / TARGET - 1):.0f}%)"
        adj = f"{med(adj_iters[name]):.0f}" if adj_iters[name] else "—"
        lines.append(f"| {name} | {it} | {adj} | {1e3 * med(times[name]):.1f} | {ratio:.2f}× | {ok} |")
    table = "\n".join(lines)
    print(table)

    if args.profile:
        name = next(n for n in names if n != "vanilla")
        cfg, task, model, opt = variants[name]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[:2]:
                train_step(task, model, opt, b)
        prof_text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"profile of 2 steps of {name}:\n{prof_text}")

    if args.docs:
        m, f = cfg0.model, cfg0.fpsa
        shown = f"{args.checkpoint}/config.yaml" if args.checkpoint else args.config
        solver = (
            f"the weights of `{args.checkpoint}/model.pt`, reloaded before each step; the solver stops at the "
            f"run's own fpsa.tol {f.tol:g} (max_iter {f.max_iter}, damping {f.damping:g}, jac_reg {f.jac_reg:g}), "
            f"the implicit adjoint at adj_tol {f.adj_tol:g}"
            if args.checkpoint
            else "the solver is forced to run exactly n iterations (`fpsa.tol=1e-30`)"
        )
        write_result(
            args.docs,
            SECTION_TRAINED if args.checkpoint else SECTION,
            f"Model `{shown}` (d_model {m.d_model}, {m.n_layers} blocks, {m.n_heads} heads), "
            f"{batch_size} examples × {cfg0.data.seq_len} tokens per step (one rank's share), forward + "
            f"backward + AdamW, one process, {args.threads} thread(s); {solver}. All variants interleaved in "
            f"rotating order, {args.repeats} rounds after 2 warm-up rounds.",
            loads,
            table,
        )


if __name__ == "__main__":
    main()

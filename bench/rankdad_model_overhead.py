"""rank-dAD compression cost on the benchmark model, against that model's backward time (issue 9 target: ≤ 10%).

One process (world size 1, so no communication), one rank's share of the batch. Per round, interleaved:

- plain: forward, then `loss.backward()` of the unmodified model (autograd forms every weight gradient);
- per rank-dAD variant, on its own copy of the model (`comm.overlap=false`, so everything rank-dAD adds runs in
  `synchronize()` and is timed apart from backward): forward, `loss.backward()` with dAD capture (no weight
  gradients formed), then `strategy.synchronize()`: take the (A, Δ) pairs, error feedback (dense Δᵀ A +
  residual), subspace iteration, QR, combining the gathered factors, σ for the log, the residual update, and the
  (here trivial) rest all-reduce.

Reported: compress = synchronize time, as a share of the plain backward; and the net cost, (captured backward
+ compress) / plain backward − 1, since capture itself skips the weight-gradient products. Medians over rounds.
This command times on the CPU; `python -m bench.gpu_check` runs the same measurement (`measure`) on a GPU at
BERT-base sizes (d = 768, N ≥ 16k rows), timed with CUDA events.

    .venv/bin/python -m bench.rankdad_model_overhead --docs docs/benchmarks.md     # ~1 min on 1 core
    .venv/bin/python -m bench.rankdad_model_overhead --tiny
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from bench._common import CPU, ROOT, argument_parser, load, to_device, write_result
from bench._timing import Timer
from dtrain.compression import build_strategy
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.model import build_model
from dtrain.trainer import loss_fn

SECTION = "## rank-dAD compression overhead on the benchmark model (issue 9)"
TARGET = 0.10
VARIANTS = {
    "k1 EF bf16": ["comm.rank=1", "comm.factor_dtype=bf16"],
    "k1 EF": ["comm.rank=1"],
    "k4 EF": ["comm.rank=4"],
    "k4 no EF": ["comm.rank=4", "comm.error_feedback=false"],
    "k4 EF twoway": ["comm.rank=4", "comm.rankdad_mode=twoway"],
}


def measure(
    config: str, sets: list[str], batch_size: int, repeats: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Seconds per round of the plain backward ({"plain": {"backward": [...]}}) and, per rank-dAD variant, of its
    captured backward and its compression ({name: {"backward": [...], "compress": [...]}}), `repeats` rounds
    after two warm-up rounds, timed on `device` (`bench._timing.Timer`)."""
    cfg = load_config(ROOT / config, sets)
    task = build_task(cfg.data)
    batches = [to_device(task.batch("train", i * batch_size, batch_size), device) for i in range(4)]
    timer = Timer(device)

    def fresh():
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg, task.spec).to(device)

    plain = fresh()
    runs = {}
    for name, overrides in VARIANTS.items():
        vcfg = load_config(ROOT / config, [*sets, "comm.strategy=rankdad", "comm.overlap=false", *overrides])
        model = fresh()
        strategy = build_strategy(vcfg.comm)
        runs[name] = (model, strategy.attach(model), strategy)

    def loss_of(fwd, b):
        return loss_fn(fwd(b.tokens, b.mask), b.targets, task.spec.targets_per_example)

    times: dict[str, dict[str, list[float]]] = {"plain": {"backward": []}}
    times.update({n: {"backward": [], "compress": []} for n in runs})
    for r in range(repeats + 2):
        b = batches[r % len(batches)]
        names = ["plain", *runs]
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            if name == "plain":
                loss = loss_of(plain, b)
                backward = timer.seconds(loss.backward)
                plain.zero_grad(set_to_none=True)
                if r >= 2:
                    times["plain"]["backward"].append(backward)
                continue
            model, fwd, strategy = runs[name]
            loss = loss_of(fwd, b)
            backward = timer.seconds(loss.backward)
            compress = timer.seconds(strategy.synchronize)
            model.zero_grad(set_to_none=True)
            if r >= 2:
                times[name]["backward"].append(backward)
                times[name]["compress"].append(compress)
    return times


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--config", default="configs/bench/s5_d256.yaml")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default batch_size / 2)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.config, args.repeats = "tests/configs/tiny.yaml", 2
    torch.set_num_threads(args.threads)

    cfg = load_config(ROOT / args.config, args.set)
    batch_size = args.batch or max(1, cfg.train.batch_size // 2)
    loads = [load()]
    times = measure(args.config, args.set, batch_size, args.repeats, CPU)
    loads.append(load())

    med = statistics.median
    plain_bwd = med(times["plain"]["backward"])
    lines = [
        f"plain backward (autograd forms every weight gradient): **{1e3 * plain_bwd:.1f} ms** (median)",
        "",
        "| rank-dAD variant | captured backward (ms) | compress = synchronize (ms) | compress / plain backward "
        "| net: (captured backward + compress) / plain backward − 1 | target ≤ 10% |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        bwd, comp = med(times[name]["backward"]), med(times[name]["compress"])
        share = comp / plain_bwd
        net = (bwd + comp) / plain_bwd - 1
        ok = "met" if share <= TARGET else (f"net met ({100 * net:+.0f}%), gross not" if net <= TARGET else "not met")
        lines.append(f"| {name} | {1e3 * bwd:.1f} | {1e3 * comp:.1f} | {100 * share:.0f}% | {100 * net:+.0f}% | {ok} |")
    table = "\n".join(lines)
    print(table)
    if args.docs:
        m = cfg.model
        write_result(
            args.docs,
            SECTION,
            f"Model `{args.config}` (d_model {m.d_model}, {m.n_layers} blocks, {cfg.fpsa.backward} FPSA "
            f"backward), {batch_size} examples × {cfg.data.seq_len} tokens = {batch_size * cfg.data.seq_len} "
            f"rows per layer, one process, {args.threads} thread(s), world size 1 (no communication); "
            f"{args.repeats} rounds after 2 warm-up rounds, all variants interleaved in rotating order; "
            "medians. "
            + (
                "No GPU in this run: the BERT-base-sized GPU cases were not measured."
                if not torch.cuda.is_available()
                else ""
            ),
            loads,
            table,
        )


if __name__ == "__main__":
    main()

"""Bytes per step against final accuracy: rank-dAD variants side by side with all-reduce, DDP and both PowerSGDs.

Every variant trains the same model from the same seed on the same examples for the same number of steps
(2 processes through torchrun, `configs/bench/s5_d256.yaml` by default), one after the other in this one
invocation. Bytes are the payload one rank hands to collectives per step (`comm/bytes_per_step` in
summary.json, exact by construction), the ratio is against a plain fp32 all-reduce of the same model, and the
accuracy is the held-out accuracy at the end. Accuracy and bytes do not depend on machine load; wall time does
and is reported only for orientation.

    .venv/bin/python -m bench.bytes_vs_accuracy --docs docs/benchmarks.md            # ~35 min on 2 cores
    .venv/bin/python -m bench.bytes_vs_accuracy --only allreduce rankdad-k4-bf16-rest16  # a subset
    .venv/bin/python -m bench.bytes_vs_accuracy --tiny                                # seconds (smoke test)

Run directories go to --out (default runs/bench/bytes); a variant whose run directory already holds a
summary.json is not trained again (delete the directory, or pass --fresh, to re-run it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench._common import ROOT, argument_parser, command_line, train_run, write_result
from dtrain import metrics
from dtrain.metrics import format_bytes

SECTION = "## Bytes per step vs final accuracy (issue 9, {name})"

# label -> overrides; the peers first, then rank-dAD from the safest to the most aggressive
VARIANTS: dict[str, list[str]] = {
    "allreduce": ["comm.strategy=allreduce"],
    "ddp": ["comm.strategy=ddp"],
    "ddp-powersgd-k1": ["comm.strategy=ddp-powersgd", "comm.rank=1"],
    "ddp-powersgd-k4": ["comm.strategy=ddp-powersgd", "comm.rank=4"],
    "powersgd-k1": ["comm.strategy=powersgd", "comm.rank=1"],
    "powersgd-k1-bf16": ["comm.strategy=powersgd", "comm.rank=1", "comm.factor_dtype=bf16"],
    "powersgd-k2-bf16": ["comm.strategy=powersgd", "comm.rank=2", "comm.factor_dtype=bf16"],
    "powersgd-k4": ["comm.strategy=powersgd", "comm.rank=4"],
    "dad": ["comm.strategy=dad"],
    "rankdad-k8": ["comm.strategy=rankdad", "comm.rank=8"],
    "rankdad-k4": ["comm.strategy=rankdad", "comm.rank=4"],
    "rankdad-k2": ["comm.strategy=rankdad", "comm.rank=2"],
    "rankdad-k1": ["comm.strategy=rankdad", "comm.rank=1"],
    "rankdad-k4-noef": ["comm.strategy=rankdad", "comm.rank=4", "comm.error_feedback=false"],
    "rankdad-k1-noef": ["comm.strategy=rankdad", "comm.rank=1", "comm.error_feedback=false"],
    "rankdad-k4-twoway": ["comm.strategy=rankdad", "comm.rank=4", "comm.rankdad_mode=twoway"],
    "rankdad-k4-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-k3-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=3",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-k2-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=2",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-k2-bf16-rest16-pi2": [
        "comm.strategy=rankdad",
        "comm.rank=2",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
        "comm.power_iters=2",
    ],
    "rankdad-k2-bf16-rest16-pi4": [
        "comm.strategy=rankdad",
        "comm.rank=2",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
        "comm.power_iters=4",
    ],
    "rankdad-k1-bf16-rest16-pi2": [
        "comm.strategy=rankdad",
        "comm.rank=1",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
        "comm.power_iters=2",
    ],
    "rankdad-k1-bf16-rest16-pi4": [
        "comm.strategy=rankdad",
        "comm.rank=1",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
        "comm.power_iters=4",
    ],
    "rankdad-k2-fp16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=2",
        "comm.factor_dtype=fp16",
        "comm.rest_dtype=fp16",
    ],
    "rankdad-k1-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=1",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-allreduce-k4-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-allreduce-k3-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=3",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-allreduce-k2-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=2",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    # per-layer ranks from a wire budget (docs/dad.md, "Ranks from a budget"): wire bytes per rank per step, rest
    # and row counts included. The figures are for S = 4: 96,790 B is 1/100 of fp32 ring all-reduce's 9.68 MB
    # there; 115,728 B is what a uniform k = 3 in the all-reduce form puts on the wire (equal bytes)
    "rankdad-allreduce-budget96790-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.budget_bytes=96790",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-allreduce-budget115728-bf16-rest16": [
        "comm.strategy=rankdad",
        "comm.budget_bytes=115728",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-int8-k4-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.factor_dtype=int8",
        "comm.rest_dtype=bf16",
    ],
    # 8-bit factors summed by the quantized all-reduce (at most dtypes.QUANT_BLOCK values per fp32 scale)
    "rankdad-allreduce-int8-k4-rest16": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=int8",
        "comm.rest_dtype=bf16",
    ],
    "rankdad-allreduce-int8-k4-rest8": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=int8",
        "comm.rest_dtype=int8",
    ],
    "rankdad-allreduce-int8-k3-rest8": [
        "comm.strategy=rankdad",
        "comm.rank=3",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=int8",
        "comm.rest_dtype=int8",
    ],
    "powersgd-k4-bf16": ["comm.strategy=powersgd", "comm.rank=4", "comm.factor_dtype=bf16"],
    "auto-k2-bf16-rest16": [
        "comm.strategy=auto",
        "comm.rank=2",
        "comm.factor_dtype=bf16",
        "comm.rest_dtype=bf16",
        "comm.power_iters=2",
    ],
}
TINY_CONFIG = "tests/configs/tiny.yaml"
TINY_VARIANTS = ["allreduce", "rankdad-k2-bf16-rest16-pi2"]


def split_of(config: str) -> dict[str, int]:
    """Parameters of the configured model: all, Linear weights, the rest (what dAD strategies all-reduce raw)."""
    from torch import nn

    from dtrain.config import load_config
    from dtrain.data import build_task
    from dtrain.model import build_model

    cfg = load_config(ROOT / config)
    model = build_model(cfg, build_task(cfg.data).spec)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return {"params": total, "linear_weights": linear, "rest": total - linear}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for seed in args.seeds:
        for label in args.only:
            run_dir = Path(args.out) / f"{label}-s{seed}"
            if args.collect and not (run_dir / "summary.json").exists():
                continue
            overrides = list(VARIANTS[label]) + [f"train.seed={seed}"] + list(args.set)
            print(f"[bytes_vs_accuracy] {label} seed {seed} ...", flush=True)
            r = train_run(args.config, overrides, run_dir, nproc=args.nproc, reuse=not args.fresh)
            s = r["summary"]
            rows.append(
                {
                    "label": label,
                    "seed": seed,
                    "overrides": VARIANTS[label],
                    "acc": s[metrics.FINAL_VAL_ACC],
                    "bytes": s[metrics.COMM_BYTES_PER_STEP],
                    "ratio": s[metrics.COMPRESSION_RATIO],
                    "world": s[metrics.WORLD_SIZE],
                    "wire": s[metrics.COMM_WIRE_BYTES_PER_STEP],
                    "wire_ratio": s[metrics.COMM_WIRE_RATIO],
                    "allreduce_bytes": s[metrics.COMM_ALLREDUCE_BYTES_PER_STEP],
                    "wall_s": s[metrics.WALL_S],
                    "step_s": s[metrics.TIME_STEP_S_MEAN],
                    "skipped": s[metrics.SKIPPED_STEPS],
                    "load": r["load"],
                }
            )
            print(
                f"    acc {s['final/val_acc']:.4f}  {format_bytes(s['comm/bytes_per_step'])}/step  "
                f"{s['compression_ratio']:.1f}x",
                flush=True,
            )
    return rows


def table(rows: list[dict[str, Any]], labels: list[str]) -> tuple[str, dict[str, dict[str, float]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    base = {r["seed"]: r["acc"] for r in by.get("allreduce", [])}
    agg: dict[str, dict[str, float]] = {}
    worlds = sorted({r["world"] for r in rows})
    at = f"S = {worlds[0]}" if len(worlds) == 1 else "at its S"
    lines = [
        f"| variant | settings | payload/step per rank | wire/step per rank ({at}) "
        f"| × fewer wire bytes than fp32 ring all-reduce ({at}) | final val acc "
        "| Δ acc vs allreduce (points, same seed) | within 1 point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        rs = by.get(label)
        if not rs:
            continue
        accs = [r["acc"] for r in rs]
        deltas = [100 * (r["acc"] - base[r["seed"]]) for r in rs if r["seed"] in base]
        delta = statistics.mean(deltas) if deltas else float("nan")
        agg[label] = {"acc": statistics.mean(accs), "bytes": rs[0]["bytes"], "ratio": rs[0]["ratio"], "delta": delta}
        settings = " ".join(o.replace("comm.", "") for o in rs[0]["overrides"])
        acc_txt = " / ".join(f"{a:.3f}" for a in accs)
        ok = "—" if label == "allreduce" or not deltas else ("yes" if delta >= -1.0 else "no")
        # null at world size 1: no link, nothing to compare
        wire_ratio = "—" if rs[0]["wire_ratio"] is None else f"{rs[0]['wire_ratio']:.1f}×"
        lines.append(
            f"| {label} | `{settings}` | {format_bytes(rs[0]['bytes'])} | {format_bytes(rs[0]['wire'])} "
            f"| {wire_ratio} | {acc_txt} "
            f"| {delta:+.1f} | {ok} |"
        )
    return "\n".join(lines), agg


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--config", default="configs/bench/s5_d256.yaml")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants to run (default: all): {', '.join(VARIANTS)}",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument("--out", default="runs/bench/bytes")
    ap.add_argument("--fresh", action="store_true", help="re-run variants whose run directory exists")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the finished runs under --out among the requested variants and seeds",
    )
    ap.add_argument("--docs", type=Path, help="write the table into this markdown file's section")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny model, a few steps, two variants")
    args = ap.parse_args()
    if args.tiny:
        args.config = TINY_CONFIG
        args.only = args.only or TINY_VARIANTS
        args.set = ["train.steps=4", "eval.every=0", "checkpoint.every=0", *args.set]
    args.only = args.only or list(VARIANTS)

    rows = run(args)
    text, agg = table(rows, args.only)
    split = split_of(args.config)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "aggregate": agg, "split": split}, indent=1))
    if args.docs:
        loads = [x for r in rows for x in r["load"]]
        steps = [o for o in args.set if o.startswith("train.steps")]
        seeds = sorted({r["seed"] for r in rows})
        setup = (
            f"Model: `{args.config}` (SELF-Transformer, fixed-point attention, {split['params']:,} parameters, of "
            f"which {split['linear_weights']:,} in Linear weights and {split['rest']:,} in embeddings, LayerNorms and "
            f"biases); {args.nproc} processes (gloo, torchrun), the same seeds (of {seeds}) and steps"
            f"{' (' + ', '.join(steps) + ')' if steps else ''} for every variant. fp32 all-reduce payload: "
            f"{format_bytes(rows[0]['allreduce_bytes'])}/step. Bytes and accuracy do not depend on machine load."
        )
        command = (
            f"Command: `{command_line()}` tabulates the finished runs; each was trained by "
            f"`.venv/bin/python -m bench.bytes_vs_accuracy --config {args.config}"
            f"{'' if args.nproc == 2 else f' --nproc {args.nproc}'} --out {args.out} --only "
            "VARIANT --seeds SEED` (its resolved config is `config.yaml` in its run directory)."
            if args.collect
            else None
        )
        # the 2-process tables keep their heading; other world sizes get their own section
        name = Path(args.config).stem + ("" if args.nproc == 2 else f", S = {args.nproc}")
        write_result(args.docs, SECTION.format(name=name), setup, loads, text, command=command)


if __name__ == "__main__":
    main()

"""Wire bytes per rank against the world size S, for every strategy: where all-gather traffic grows as (S−1) ×
payload and ring all-reduce traffic stays below 2 × payload.

Each variant trains `configs/bench/s5_d256.yaml` for a few steps on S gloo ranks of this machine (torchrun), at
S = 2, 4, 8 and 16 by default. Bytes are exact by construction (`dtrain.compression.Comm` counts every tensor it
hands to a collective; wire bytes are what the collective's algorithm puts on each rank's link: ring all-reduce
2(S−1)/S × payload, all-gather (S−1) × payload), so a few steps suffice and machine load does not matter. The
figures are those of the LAST step, when PowerSGD has started compressing (comm.start_step) and auto has made
its plan. The ratio is fp32 ring all-reduce's wire bytes at the same S (2(S−1)/S × 4 × parameters) divided by
the variant's.

    .venv/bin/python -m bench.wire_vs_world --docs docs/benchmarks.md      # ~15 min on 2 cores
    .venv/bin/python -m bench.wire_vs_world --worlds 2 4 --only allreduce rankdad-allreduce-k4-bf16
    .venv/bin/python -m bench.wire_vs_world --tiny                           # seconds (smoke test)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._common import ROOT, argument_parser, train_run, write_result
from dtrain import metrics
from dtrain.metrics import format_bytes, ring_allreduce_wire_bytes

SECTION = "## Wire bytes per rank vs world size (issue 17)"
_BF16 = ["comm.factor_dtype=bf16", "comm.rest_dtype=bf16"]

# label -> overrides
VARIANTS: dict[str, list[str]] = {
    "allreduce": ["comm.strategy=allreduce"],
    "ddp": ["comm.strategy=ddp"],
    "ddp-powersgd-k4": ["comm.strategy=ddp-powersgd", "comm.rank=4"],
    "powersgd-k4-bf16": ["comm.strategy=powersgd", "comm.rank=4", "comm.factor_dtype=bf16"],
    "powersgd-k4-int8": ["comm.strategy=powersgd", "comm.rank=4", "comm.factor_dtype=int8"],
    "dad": ["comm.strategy=dad"],
    "rankdad-oneway-k4-bf16": ["comm.strategy=rankdad", "comm.rank=4", *_BF16],
    "rankdad-allreduce-k4-bf16": ["comm.strategy=rankdad", "comm.rank=4", "comm.rankdad_mode=allreduce", *_BF16],
    "rankdad-allreduce-k4-int8": [
        "comm.strategy=rankdad",
        "comm.rank=4",
        "comm.rankdad_mode=allreduce",
        "comm.factor_dtype=int8",
        "comm.rest_dtype=int8",
    ],
    "auto-k4-bf16": ["comm.strategy=auto", "comm.rank=4", *_BF16],
}
STEPS = 3
TINY_CONFIG = "tests/configs/tiny.yaml"


def measure(config: str, out: Path, worlds: list[int], labels: list[str], extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    for world in worlds:
        for label in labels:
            overrides = [*VARIANTS[label], f"train.steps={STEPS}", "eval.every=0", "checkpoint.every=0", *extra]
            print(f"S={world:>2} {label} ...", flush=True)
            r = train_run(config, overrides, out / f"{label}-w{world}", nproc=world)
            last = [m for m in r["metrics"] if metrics.TRAIN_LOSS in m][-1]
            allreduce = r["summary"][metrics.COMM_ALLREDUCE_BYTES_PER_STEP]
            reference = ring_allreduce_wire_bytes(allreduce, world)
            wire = last[metrics.COMM_WIRE_BYTES]
            rows.append(
                {
                    "label": label,
                    "world": world,
                    "payload": last[metrics.COMM_BYTES_SENT],
                    "wire": wire,
                    "ratio": reference / wire if wire else float("inf"),
                    "load": r["load"],
                }
            )
            print(f"      payload {format_bytes(rows[-1]['payload'])}  wire {format_bytes(wire)}", flush=True)
    return rows


def table(rows: list[dict[str, Any]], worlds: list[int], labels: list[str]) -> str:
    by = {(r["label"], r["world"]): r for r in rows}
    head = "| variant | payload / rank (last step) | " + " | ".join(
        f"wire / rank at S = {s} (× fewer than fp32 ring all-reduce)" for s in worlds
    )
    lines = [head + " |", "|---" * (2 + len(worlds)) + "|"]
    for label in labels:
        cells = [label, format_bytes(by[label, worlds[0]]["payload"]) if (label, worlds[0]) in by else "—"]
        for s in worlds:
            r = by.get((label, s))
            cells.append(f"{format_bytes(r['wire'])} ({r['ratio']:.1f}×)" if r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--config", default="configs/bench/s5_d256.yaml")
    ap.add_argument("--out", default="runs/bench/wire_vs_world")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants only")
    ap.add_argument("--set", nargs="*", default=[], dest="extra", help="extra config overrides for every run")
    ap.add_argument("--docs", type=Path, help="write the table as a section of this file (docs/benchmarks.md)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny model, S = 2, two variants")
    args = ap.parse_args()
    labels = args.only or list(VARIANTS)
    config, worlds = args.config, args.worlds
    if args.tiny:
        config, worlds, labels = TINY_CONFIG, [2], args.only or ["allreduce", "rankdad-allreduce-k4-bf16"]
    rows = measure(str(ROOT / config), Path(args.out), worlds, labels, args.extra)
    text = table(rows, worlds, labels)
    print(text)
    if args.docs:
        setup = (
            f"Model: `{config}`; {STEPS} steps per run on S gloo ranks of this machine (torchrun, one process per "
            "rank), figures of the last step. Payload: what one rank hands to collectives per step; wire: what its "
            "link carries (ring all-reduce 2(S−1)/S × payload, all-gather (S−1) × payload). Exact by "
            "construction: machine load changes nothing here."
        )
        loads = [x for r in rows for x in r["load"]]
        write_result(args.docs, SECTION, setup, loads, text)


if __name__ == "__main__":
    main()

"""GPU validation on one GPU: correctness of the production path, then the GPU figures against their targets.

One command, within 8 minutes on one GPU (each part has a time budget; the JSON records its wall time):

1. correctness (`bench._gpu_correctness`): `pytest -m gpu`; every strategy through the real trainer at world
   size 1 with NCCL; 2 ranks with gloo on CUDA tensors, dad = allreduce (< 1e-5) and full-rank rankdad = allreduce
   (< 1e-4) on model.pt; a bf16 autocast run;
2. performance (`bench._gpu_perf`), timed with CUDA events: rank-dAD's factored power iteration against the
   dense gradient at 768→3072 and 1024→4096, N = 8k…64k rows, k = 4 and 8; its compression as a share of the
   backward at BERT-base widths; FPSA step time and memory against vanilla (d_model 768, 12 heads, sequence 512,
   batch 8).

Writes OUT/gpu_check.json (after every part, so a run cut short keeps what it measured) and rewrites its section
of docs/benchmarks.md. `--dry-run` runs every part on the CPU at tiny sizes (gloo on CPU tensors, wall-clock
timers): its JSON says so, and its section goes to OUT/benchmarks.md, never into the docs.

    .venv/bin/python -m bench.gpu_check                                  # on a GPU machine (budget 8 min)
    .venv/bin/python -m bench.gpu_check --only pairs fpsa                # some parts only (a rerun)
    .venv/bin/python -m bench.gpu_check --dry-run --out /tmp/gpu_check   # CPU, minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import _gpu_correctness as correctness
from bench import _gpu_perf as perf
from bench._common import ROOT, argument_parser, command_line, machine, write_section
from bench._timing import Timer

SECTION = "## GPU validation (issue 20)"
BUDGET_S = 480
# part: (its title, the seconds it may take on one GPU); the budgets sum to less than BUDGET_S
PARTS = {
    "pytest": ("pytest -m gpu", 80),
    "strategies": ("trainer, every strategy at world size 1", 150),
    "pairs": ("trainer, 2 ranks", 75),
    "bf16": ("trainer, bf16 autocast", 30),
    "factored": ("rank-dAD factored vs dense", 40),
    "share": ("rank-dAD compression share", 50),
    "fpsa": ("FPSA step time and memory", 40),
}
CORRECTNESS = {
    "pytest": lambda runs, dry_run: correctness.run_tests(),
    "strategies": correctness.run_strategies,
    "pairs": correctness.run_pairs,
    "bf16": correctness.run_bf16,
}
PERF = {"factored": perf.factored_vs_dense, "share": perf.compression_share, "fpsa": perf.fpsa}
DRY_RUN_NOTE = (
    "DRY RUN on the CPU at tiny sizes (gloo on CPU tensors, wall-clock timers): it checks that every part of "
    "bench.gpu_check runs; no figure in it is a GPU figure"
)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": machine(), "torch": torch.__version__, "cuda": torch.version.cuda}
    # "highest": fp32 matrix products stay fp32 (no TF32), as the trainer leaves them
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["gpu_memory_gib"] = (
        round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None
    )
    info["driver"] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f"{info['gpu']} ({info['gpu_memory_gib']} GiB)" if info["gpu"] else "no GPU"
    return (
        f"{gpu}, CUDA {info['cuda']}, driver {info['driver']}, torch {info['torch']}, float32 matmul precision "
        f"{info['float32_matmul_precision']}; host: {info['host']}"
    )


def run(out: Path, dry_run: bool, parts: list[str], json_path: Path) -> dict[str, Any]:
    start = time.perf_counter()
    device = torch.device("cpu" if dry_run else "cuda")
    sizes = perf.DRY_RUN if dry_run else perf.GPU
    runs = out / "runs"
    result: dict[str, Any] = {
        "dry_run": dry_run,
        "note": DRY_RUN_NOTE if dry_run else "GPU run",
        "machine": machine_info(),
        "command": command_line(),
        "clock": Timer(device).clock,
        "sizes": dataclasses.asdict(sizes),
        "budget_s": BUDGET_S,
        "parts": {},
        "checks": [],
        "perf": {},
    }
    for key in parts:
        title, budget = PARTS[key]
        print(f"gpu_check: {title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            if key in CORRECTNESS:
                value = CORRECTNESS[key](runs, dry_run)
                result["checks"].extend(value if isinstance(value, list) else [value])
            else:
                result["perf"][key] = PERF[key](sizes, device)
                result["checks"].append(correctness.check(title, True, "measured", t0))
        except Exception as err:  # noqa: BLE001 - a broken part is recorded; the other parts still run
            result["checks"].append(correctness.check(title, False, f"{type(err).__name__}: {err}", t0))
        wall = time.perf_counter() - t0
        result["parts"][key] = {"title": title, "wall_s": round(wall, 1), "budget_s": budget, "met": wall <= budget}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["within_budget"] = result["wall_s"] <= BUDGET_S
        result["passed"] = all(c["passed"] for c in result["checks"])
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        failed = [c["name"] for c in result["checks"] if not c["passed"]]
        print(f"gpu_check: {title}: {wall:.0f} s" + (f"; failed so far: {failed}" if failed else ""), flush=True)
    return result


# ---------------------------------------------------------------------------------------------- the docs section
def _met(row: dict[str, Any]) -> str:
    return {True: "met", False: "**not met**", None: "—"}[row["met"]]


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "—" if value is None else format(value, fmt)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def section(result: dict[str, Any]) -> str:
    p, sizes = result["perf"], result["sizes"]
    model = f"`{sizes['config']}`" + (f" with `{' '.join(sizes['sets'])}`" if sizes["sets"] else "")
    parts = [
        SECTION,
        "",
        f"**{result['note']}.**" if result["dry_run"] else "One run of the command below on one GPU.",
        "",
        f"Machine: {machine_line(result['machine'])}. Timer: {result['clock']} (medians over repeats).",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Wall time {result['wall_s']:.0f} s (budget {result['budget_s']} s: "
        f"{'met' if result['within_budget'] else '**not met**'}); every correctness check passed: "
        f"{'yes' if result['passed'] else '**no**'}.",
        "",
        _table(
            ["part", "wall time (s)", "budget (s)", "met"],
            [
                [q["title"], f"{q['wall_s']:.0f}", str(q["budget_s"]), "met" if q["met"] else "**not met**"]
                for q in result["parts"].values()
            ],
        ),
        "",
        _table(
            ["check", "result", "detail", "seconds"],
            [
                [
                    c["name"],
                    "pass" if c["passed"] else "**FAIL**",
                    c["detail"].splitlines()[0].replace("|", "\\|"),
                    f"{c['seconds']:.0f}",
                ]
                for c in result["checks"]
            ],
        ),
    ]
    if "factored" in p:
        parts += [
            "",
            "rank-dAD, one layer: power iteration through the captured factors against forming Δᵀ A first "
            "(target: factored faster from the target row count on)",
            "",
            _table(
                [
                    "in→out",
                    "N rows",
                    "k",
                    "factored (ms)",
                    "dense Δᵀ A + iterate (ms)",
                    "dense / factored",
                    "target",
                    "met",
                ],
                [
                    [
                        f"{r['in']}→{r['out']}",
                        str(r["rows"]),
                        str(r["k"]),
                        _num(r["factored_ms"], ".3f"),
                        _num(r["dense_ms"], ".3f"),
                        f"{r['dense_over_factored']:.2f}×",
                        "—" if r["target"] is None else f"> {r['target']:g}×",
                        _met(r),
                    ]
                    for r in p["factored"]
                ],
            ),
        ]
    if "share" in p:
        parts += [
            "",
            f"rank-dAD compression (`synchronize`) as a share of the plain backward; model {model}, world size 1 "
            "(no communication)",
            "",
            _table(
                [
                    "variant",
                    "N rows",
                    "plain backward (ms)",
                    "captured backward (ms)",
                    "compress (ms)",
                    "compress / plain backward",
                    "net",
                    "target",
                    "met",
                ],
                [
                    [
                        r["variant"],
                        str(r["rows"]),
                        _num(r["plain_backward_ms"]),
                        _num(r["captured_backward_ms"]),
                        _num(r["compress_ms"]),
                        f"{100 * r['share']:.0f}%",
                        f"{100 * r['net']:+.0f}%",
                        "—" if r["target"] is None else f"≤ {100 * r['target']:.0f}%",
                        _met(r),
                    ]
                    for r in p["share"]
                ],
            ),
        ]
    if "fpsa" in p:
        parts += [
            "",
            f"FPSA training step (forward, backward, AdamW; solver forced to n iterations) against vanilla attention; "
            f"model {model}, {sizes['fpsa_batch']} examples per step; memory: the step's peak allocation above what "
            "was allocated before it, and what autograd saved for backward",
            "",
            _table(
                [
                    "model",
                    "solver iterations",
                    "adjoint iterations",
                    "step (ms)",
                    "/ vanilla",
                    "target",
                    "met",
                    "peak step memory (MiB)",
                    "saved for backward (MiB)",
                ],
                [
                    [
                        r["model"],
                        _num(r["solver_iters"]),
                        _num(r["adjoint_iters"], ".0f"),
                        _num(r["step_ms"]),
                        f"{r['over_vanilla']:.2f}×",
                        "—" if r["target"] is None else f"≤ {r['target']:g}×",
                        _met(r),
                        _num(r["peak_step_mib"]),
                        _num(r["saved_mib"]),
                    ]
                    for r in p["fpsa"]["step"]
                ],
            ),
            "",
            _table(
                ["backward", "max_iter", "figure", "low (MiB)", "high (MiB)", "high / low", "target", "met"],
                [
                    [
                        r["backward"],
                        " → ".join(map(str, r["max_iter"])),
                        r["figure"],
                        _num(r["low_mib"]),
                        _num(r["high_mib"]),
                        f"{r['high_over_low']:.2f}×",
                        f"≤ {r['target']:g}×",
                        _met(r),
                    ]
                    for r in p["fpsa"]["memory_vs_max_iter"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--out", type=Path, help="where gpu_check.json and the runs go (default runs/bench/gpu_check)")
    ap.add_argument("--docs", type=Path, help="the file whose section is rewritten (default docs/benchmarks.md)")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes; never into the docs")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), help="these parts only (default: all, in this order)")
    args = ap.parse_args()
    if args.dry_run and args.docs:
        print(
            "gpu_check: --docs with --dry-run: a dry run never writes the docs (its section: OUT/benchmarks.md)",
            file=sys.stderr,
        )
        sys.exit(2)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device: run this on a GPU machine, or with --dry-run", file=sys.stderr)
        sys.exit(2)
    out = args.out or ROOT / ("runs/bench/gpu_check_dry_run" if args.dry_run else "runs/bench/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    json_path = out / "gpu_check.json"
    result = run(out, args.dry_run, args.only or list(PARTS), json_path)
    text = section(result)
    print(text)
    write_section(out / "benchmarks.md" if args.dry_run else (args.docs or ROOT / "docs" / "benchmarks.md"), text)
    print(f"gpu_check: {json_path}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()

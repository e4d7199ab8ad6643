"""Soak: a long run of the quickstart with rank-dAD on 2 ranks, watched from outside (issue 19).

Every `--every` seconds it samples, over the torchrun agent's processes (workers and their DataLoader workers):
resident memory (VmRSS) and open file descriptors; and in the run directory: the step directories under
checkpoints/ (count and size) and metrics.jsonl's lines. A leak shows as growth after warm-up; the figure is the
growth from the warm-up window (20–30% of the steps) to the last 10% of them, target ≤ 5% for memory and
descriptors. The checkpoint directory must stay within checkpoint.keep checkpoints plus the one being written,
and metrics.jsonl must grow linearly in the steps.

    .venv/bin/python -m bench.soak --docs docs/reliability.md        # 5,000 steps (27 min on a loaded 2-core machine)
    .venv/bin/python -m bench.soak --steps 600 --out /tmp/soak       # a short one
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, TORCHRUN, argument_parser, command_line, load, machine, write_section

SECTION = "## Soak: memory, descriptors and files over a long run"
CONFIG = "configs/quickstart.yaml"
TARGET_GROWTH = 0.05


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        out += children
        frontier += children
    return out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(agent: int, run_dir: Path) -> dict[str, Any] | None:
    """One sample of the job, or None while no worker or no step is there yet."""
    rss = fds = 0
    workers = _descendants(agent)
    for pid in workers:
        try:
            rss += _rss_kib(pid)
            fds += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            continue  # it ended between the listing and the read
    metrics = run_dir / "metrics.jsonl"
    if not workers or not metrics.exists():
        return None
    lines = metrics.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if line.strip().startswith("{")]
    if not steps:
        return None
    # every step_* directory: the kept checkpoints and the one being written (step_X.partial until it is complete;
    # the oldest is pruned only after the newest is published, so keep + 1 is the bound)
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()]
    size = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file() and not f.is_symlink())
    return {
        "t": time.monotonic(),
        "step": steps[-1],
        "processes": len(workers),
        "rss_mib": rss / 1024,
        "fds": fds,
        "metrics_lines": len(lines),
        "checkpoints": len(ckpts),
        "checkpoint_mib": size / 2**20,
    }


def soak(steps: int, out: Path, every: float, keep: int) -> dict[str, Any]:
    run_dir = out / "run"
    overrides = [
        f"train.steps={steps}",
        "comm.strategy=rankdad",
        "checkpoint.every=100",
        f"checkpoint.keep={keep}",
        "eval.every=500",
        f"run.dir={run_dir}",
        "log.wandb=disabled",
        "log.progress=false",
    ]
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "dtrain", "train", "--config", CONFIG]
    out.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with open(out / "soak.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--set", *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            s = sample(proc.pid, run_dir)
            if s is not None:
                samples.append(s)
                if len(samples) % 30 == 0:
                    print(f"soak: step {s['step']}/{steps}, {s['rss_mib']:.0f} MiB, {s['fds']} fds", flush=True)
            time.sleep(every)
    if proc.returncode:
        raise RuntimeError(f"the soak run failed (exit {proc.returncode}); see {out / 'soak.log'}")
    return {"steps": steps, "keep": keep, "wall_s": time.monotonic() - t0, "samples": samples, "load": load()}


def growth(samples: list[dict[str, Any]], key: str, steps: int) -> dict[str, float]:
    """Mean of `key` in the warm-up window (20–30% of the steps) and in the last 10% of the training steps, and
    the growth between. Samples after the last step are left out: the job is winding down (its DataLoader workers
    exit), which would hide growth."""
    warm = [s[key] for s in samples if 0.2 * steps <= s["step"] <= 0.3 * steps]
    last = [s[key] for s in samples if 0.9 * steps <= s["step"] < steps]
    if not warm or not last:
        raise RuntimeError(f"too few samples to compare {key} (warm-up {len(warm)}, end {len(last)}): use --every")
    w, e = statistics.fmean(warm), statistics.fmean(last)
    return {"warm": w, "end": e, "growth": e / w - 1, "met": e / w - 1 <= TARGET_GROWTH}


def linearity(samples: list[dict[str, Any]]) -> float:
    """Largest deviation of metrics.jsonl's lines per step from the run's overall lines per step, as a share."""
    late = [s for s in samples if s["step"] >= 100]
    rate = late[-1]["metrics_lines"] / late[-1]["step"]
    return max(abs(s["metrics_lines"] / s["step"] / rate - 1) for s in late)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    samples, steps = result["samples"], result["steps"]
    return {
        "rss": growth(samples, "rss_mib", steps),
        "fds": growth(samples, "fds", steps),
        "max_checkpoints": max(s["checkpoints"] for s in samples),
        "max_checkpoint_mib": max(s["checkpoint_mib"] for s in samples),
        "metrics_lines_per_step_deviation": linearity(samples),
    }


def section(result: dict[str, Any], figures: dict[str, Any], command: str) -> str:
    rss, fds = figures["rss"], figures["fds"]

    def row(name: str, g: dict[str, float], unit: str) -> str:
        verdict = "met" if g["met"] else "**not met**"
        return f"| {name} | {g['warm']:.1f} {unit} | {g['end']:.1f} {unit} | {100 * g['growth']:+.1f}% | {verdict} |"

    return "\n".join(
        [
            SECTION,
            "",
            f"`{CONFIG}` with `comm.strategy=rankdad`, 2 ranks (torchrun --standalone), {result['steps']:,} steps, "
            f"checkpoints every 100 steps with `checkpoint.keep={result['keep']}`; {len(result['samples'])} samples "
            f"of the agent's processes and the run directory; {result['wall_s']:.0f} s. Machine: {machine()}; "
            f"1-min load {result['load']:.1f} at the end.",
            "",
            f"Command: `{command}`",
            "",
            "| quantity | warm-up (20–30% of steps) | last 10% of steps | growth | target ≤ 5% |",
            "|---|---|---|---|---|",
            row("resident memory, all processes", rss, "MiB"),
            row("open file descriptors, all processes", fds, ""),
            "",
            f"Checkpoint directory: at most {figures['max_checkpoints']} step directories "
            f"({figures['max_checkpoint_mib']:.2f} MiB) at any sample, with `checkpoint.keep={result['keep']}`: the "
            "kept checkpoints and the one being written (the oldest is pruned only once the newest is complete, "
            "so keep + 1 is the bound). metrics.jsonl: "
            f"lines per step within {100 * figures['metrics_lines_per_step_deviation']:.1f}% of the run's rate "
            "after step 100 (linear in the steps).",
            "",
        ]
    )


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--steps", type=int, default=5000, help="training steps (default 5,000)")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples (default 2)")
    ap.add_argument("--keep", type=int, default=2, help="checkpoint.keep (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "soak", help="run directory and JSON")
    ap.add_argument("--docs", type=Path, help="rewrite this file's soak section (e.g. docs/reliability.md)")
    args = ap.parse_args()
    result = soak(args.steps, args.out, args.every, args.keep)
    figures = summarise(result)
    (args.out / "soak.json").write_text(json.dumps({**result, "figures": figures}, indent=1) + "\n")
    text = section(result, figures, command_line())
    print(text)
    if args.docs:
        write_section(args.docs, text)


if __name__ == "__main__":
    main()

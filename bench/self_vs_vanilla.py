"""SELF-Transformer (fixed-point attention) against a vanilla Transformer with identical parameters.

Each model is one run of the library's trainer (`dtrain.trainer.Trainer`, one process, world size 1): its loss,
AdamW with linear warm-up and cosine decay (train.lr, train.warmup_steps, train.weight_decay, train.grad_clip) and
its held-out evaluation, exactly as `dtrain train` does them. Both models start from the same initial parameters
(the trainer builds both from train.seed = the --seeds value, and both attention layers draw the same projections
in the same order; checked), see the same training examples in the same order for the same number of steps, and
are evaluated on the same held-out set. Reports held-out accuracy per seed, and for the FPSA model the solver
iterations each held-out example needed per layer (until all its tokens stopped) against the example's
difficulty, as a table and a plot. Each run keeps its run directory (metrics.jsonl, summary.json, model.pt, ...)
under --out.

    .venv/bin/python -m bench.self_vs_vanilla --set data.task=listops data.seq_len=32 --seeds 0 1 \\
        --docs docs/model.md --plot docs/img/fpsa_iters_vs_difficulty.png
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from bench._common import command_line, machine, write_section
from dtrain import metrics
from dtrain.config import Config, dump_config, load_config
from dtrain.data import Task
from dtrain.distributed import DistEnv, init_distributed, shutdown
from dtrain.metrics import read_metrics
from dtrain.model import SelfTransformer
from dtrain.trainer import Trainer

SECTION = "## Results: SELF vs vanilla"
# before the user's --set: the one evaluation the comparison needs is the trainer's final one, and a benchmark
# logs to its run directory only
RUN_DEFAULTS = ["eval.every=0", "log.wandb=disabled", "log.progress=false"]


@dataclass
class Run:
    attention: str
    seed: int
    accuracy: float  # over all labelled positions
    last_accuracy: float  # per-token tasks: at the last position only (the longest prefix); else = accuracy
    seconds: float  # training steps only (the trainer's time/step_s, summed), evaluation excluded
    final_loss: float
    fpsa_stats: dict[str, float]  # the fpsa/ metrics of the last training step, {} for vanilla
    example_iters: torch.Tensor  # int64 [n_layers, n_val] (FPSA), empty for vanilla
    difficulty: torch.Tensor  # int64 [n_val]


def run_config(overrides: list[str], attention: str, seed: int, out: Path) -> Config:
    """The user's settings for one run; learned_temperature is an FPSA parameter, so the vanilla run drops it."""
    own = [f"model.attention={attention}", f"train.seed={seed}", f"run.dir={out / f'{attention}-s{seed}'}"]
    if attention == "vanilla":
        own.append("model.learned_temperature=false")
    return load_config(None, [*RUN_DEFAULTS, *overrides, *own])


def check_same_start(model: SelfTransformer, initial: dict[str, torch.Tensor]) -> None:
    """The comparison's premise: the FPSA model starts from the vanilla model's initial parameters. Checked, not
    copied in: a copy would leave the FPSA model's spectral-norm vectors estimated for other weights."""
    own = model.state_dict()
    differ = [name for name, t in initial.items() if name not in own or not torch.equal(own[name], t)]
    assert not differ, f"the FPSA model does not start from the vanilla model's parameters: {differ}"


@torch.no_grad()
def probe_held_out(
    model: SelfTransformer, task: Task, cfg: Config, device: torch.device
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """What the trainer's evaluation does not break down: the accuracy at the last position, and per FPSA layer
    the iterations each held-out example needed, with the examples' difficulties (same batches as evaluate)."""
    model.eval()
    n_val, size = task.n_val, cfg.eval.batch_size  # the task may hold fewer than data.n_val (digits)
    last_correct, iters, difficulty = 0, [], []
    n_fpsa = len(model.fpsa_layers())
    for start in range(0, n_val, size):
        b = task.batch("val", start, min(size, n_val - start))
        predicted = model(b.tokens.to(device), b.mask.to(device)).argmax(dim=-1).cpu()
        hit = predicted[:, -1] == b.targets[:, -1] if task.spec.per_token else predicted == b.targets
        last_correct += int(hit.sum())
        difficulty.append(b.difficulty)
        if n_fpsa:
            iters.append(torch.stack([model.fpsa_example_iters(i).cpu() for i in range(n_fpsa)]))
    example_iters = torch.cat(iters, dim=1) if iters else torch.empty(0, dtype=torch.int64)
    return last_correct / n_val, example_iters, torch.cat(difficulty)


def train_and_measure(trainer: Trainer) -> Run:
    summary = trainer.run()
    last_step = [row for row in read_metrics(trainer.path) if metrics.TRAIN_LOSS in row][-1]
    last_accuracy, example_iters, difficulty = probe_held_out(
        trainer.model, trainer.task, trainer.cfg, trainer.env.device
    )
    return Run(
        attention=trainer.cfg.model.attention,
        seed=trainer.cfg.train.seed,
        accuracy=summary[metrics.FINAL_VAL_ACC],
        last_accuracy=last_accuracy,
        seconds=summary[metrics.TIME_STEP_S_MEAN] * summary[metrics.STEPS],
        final_loss=last_step[metrics.TRAIN_LOSS],
        fpsa_stats={k: v for k, v in last_step.items() if k.startswith(metrics.FPSA_PREFIX)},
        example_iters=example_iters,
        difficulty=difficulty,
    )


def seed_pair(overrides: list[str], seed: int, out: Path, env: DistEnv) -> list[Run]:
    """The vanilla and the FPSA run of one seed, from the same initial parameters."""
    vanilla = Trainer(run_config(overrides, "vanilla", seed, out), env)
    initial = {name: t.clone() for name, t in vanilla.model.state_dict().items()}
    runs = [train_and_measure(vanilla)]
    fpsa = Trainer(run_config(overrides, "fpsa", seed, out), env)
    check_same_start(fpsa.model, initial)
    runs.append(train_and_measure(fpsa))
    return runs


def difficulty_bins(difficulty: torch.Tensor, max_bins: int) -> list[tuple[int, int]]:
    """Inclusive (low, high) ranges covering the observed difficulties, at most max_bins of them."""
    low, high = int(difficulty.min()), int(difficulty.max())
    width = math.ceil((high - low + 1) / max_bins)
    return [(a, min(a + width - 1, high)) for a in range(low, high + 1, width)]


def iteration_table(fpsa_runs: list[Run], max_bins: int) -> tuple[str, list[dict]]:
    iters = torch.cat([r.example_iters for r in fpsa_runs], dim=1)
    difficulty = torch.cat([r.difficulty for r in fpsa_runs])
    n_layers = iters.shape[0]
    header = "| difficulty | examples | " + " | ".join(f"layer {i} mean | layer {i} median" for i in range(n_layers))
    lines = [header + " |", "|---|---|" + "---|---|" * n_layers]
    rows = []
    for low, high in difficulty_bins(difficulty, max_bins):
        chosen = (difficulty >= low) & (difficulty <= high)
        if not bool(chosen.any()):
            continue
        per_layer = [iters[i][chosen].double() for i in range(n_layers)]
        row = {
            "low": low,
            "high": high,
            "n": int(chosen.sum()),
            "mean": [float(x.mean()) for x in per_layer],
            "median": [statistics.median(x.tolist()) for x in per_layer],
        }
        rows.append(row)
        label = str(low) if low == high else f"{low}-{high}"
        cells = " | ".join(f"{m:.2f} | {md:g}" for m, md in zip(row["mean"], row["median"]))
        lines.append(f"| {label} | {row['n']} | {cells} |")
    return "\n".join(lines) + "\n", rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i in range(len(rows[0]["mean"])):
        (line,) = ax.plot(centers, [r["mean"][i] for r in rows], marker="o", label=f"layer {i} mean")
        ax.plot(
            centers,
            [r["median"][i] for r in rows],
            linestyle="--",
            marker="x",
            color=line.get_color(),
            label=f"layer {i} median",
        )
    ax.set_xlabel("difficulty")
    ax.set_ylabel("FPSA iterations per example")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg: Config, runs: list[Run], command: str, iters_table: str, plot_link: str | None) -> str:
    per_token = cfg.data.task in ("parity", "s5", "a5")
    lines = [
        f"{SECTION}\n",
        f"Command: `{command}`\n",
        f"Machine: {machine()}.\n",
        f"Task `{cfg.data.task}`, seq_len {cfg.data.seq_len}"
        + (f", max_depth {cfg.data.max_depth}" if cfg.data.task == "listops" else "")
        + f", {cfg.data.n_val} held-out examples. Model d_model={cfg.model.d_model}, {cfg.model.n_layers} "
        f"layers, {cfg.model.n_heads} heads; {cfg.train.steps} steps of batch {cfg.train.batch_size}, lr "
        f"{cfg.train.lr}. FPSA: max_iter {cfg.fpsa.max_iter}, tol {cfg.fpsa.tol}, damping "
        f"{cfg.fpsa.damping}, backward {cfg.fpsa.backward}, reinject {cfg.fpsa.reinject}, spectral_norm "
        f"{cfg.fpsa.spectral_norm}.\n",
        "| seed | attention | held-out accuracy |"
        + (" last-position accuracy |" if per_token else "")
        + " final train loss | train time (s) | FPSA iters/token, last step | FPSA converged, last step |",
        "|---|---|---|" + ("---|" if per_token else "") + "---|---|---|---|",
    ]
    for r in runs:
        stats = (
            f"{r.fpsa_stats[metrics.FPSA_ITERS_MEAN]:.2f} | {r.fpsa_stats[metrics.FPSA_CONVERGED_FRAC]:.2f}"
            if r.fpsa_stats
            else "- | -"
        )
        lines.append(
            f"| {r.seed} | {r.attention} | {r.accuracy:.4f} |"
            + (f" {r.last_accuracy:.4f} |" if per_token else "")
            + f" {r.final_loss:.4f} | {r.seconds:.0f} | {stats} |"
        )
    for attention in ("vanilla", "fpsa"):
        accs = [r.accuracy for r in runs if r.attention == attention]
        lines.append(f"\nMean held-out accuracy, {attention}: {statistics.mean(accs):.4f} over {len(accs)} seed(s).")
    lines.append("\nFPSA iterations per held-out example (until all its tokens stopped), by difficulty, all seeds:\n")
    lines.append(iters_table)
    if plot_link is not None:
        lines.append(f"![FPSA iterations against difficulty]({plot_link})\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--bins", type=int, default=8, help="at most this many difficulty bins in the table")
    parser.add_argument("--docs", type=Path, help="replace the results section of this markdown file")
    parser.add_argument("--plot", type=Path, help="write the iterations-against-difficulty plot here (PNG)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench/self_vs_vanilla"),
        help="run directories, one per attention and seed (ATTENTION-sSEED)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, args.set)
    print(dump_config(cfg))
    env = init_distributed()
    runs = []
    for seed in args.seeds:
        for r in seed_pair(args.set, seed, args.out, env):
            print(
                f"seed {seed} {r.attention}: accuracy {r.accuracy:.4f} last {r.last_accuracy:.4f} "
                f"loss {r.final_loss:.4f} {r.seconds:.0f}s {r.fpsa_stats}",
                flush=True,
            )
            runs.append(r)
    shutdown()
    table, rows = iteration_table([r for r in runs if r.attention == "fpsa"], args.bins)
    plot_link = None
    if args.plot:
        plot(rows, args.plot, f"{cfg.data.task}, seq_len {cfg.data.seq_len}: FPSA iterations vs difficulty")
        plot_link = os.path.relpath(args.plot, args.docs.parent if args.docs else Path.cwd())
    text = report(cfg, runs, command_line(), table, plot_link)
    print(text)
    if args.docs:
        write_section(args.docs, text, intro="# Model\n")


if __name__ == "__main__":
    main()

"""SELF-Transformer (fixed-point attention) against a vanilla Transformer with identical parameters.

Both models start from the same initial parameters (the vanilla model's, copied into the FPSA one), see the same
training examples in the same order for the same number of steps, and are evaluated on the same held-out set.
Single process, AdamW with linear warm-up and cosine decay (train.lr, train.warmup_steps, train.weight_decay,
train.grad_clip). Reports held-out accuracy per seed, and for the FPSA model the solver iterations each held-out
example needed per layer (until all its tokens stopped) against the example's difficulty, as a table and a plot.

    .venv/bin/python bench/self_vs_vanilla.py --set data.task=listops data.seq_len=32 --seeds 0 1 \\
        --docs docs/model.md --plot docs/img/fpsa_iters_vs_difficulty.png
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtrain.config import Config, dump_config, load_config  # noqa: E402
from dtrain.data import IGNORE, Task, build_task  # noqa: E402
from dtrain.model import SelfTransformer, build_model  # noqa: E402
from fpsa_memory import machine, write_section  # noqa: E402

SECTION = "## Results: SELF vs vanilla"
EVAL_BATCH = 256


@dataclass
class Run:
    attention: str
    seed: int
    accuracy: float  # over all labelled positions
    last_accuracy: float  # per-token tasks: at the last position only (the longest prefix); else = accuracy
    seconds: float
    final_loss: float
    fpsa_stats: dict[str, float]
    example_iters: torch.Tensor  # int64 [n_layers, n_val] (FPSA), empty for vanilla
    difficulty: torch.Tensor  # int64 [n_val]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE)


def schedule(cfg: Config):
    steps, warmup = cfg.train.steps, cfg.train.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train(cfg: Config, task: Task, initial: dict[str, torch.Tensor]) -> tuple[SelfTransformer, float, float]:
    model = build_model(cfg, task.spec)
    missing, unexpected = model.load_state_dict(initial, strict=False)
    assert not unexpected and all("sigma_u" in k or "log_temperature" in k for k in missing), missing
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    batch_size = cfg.train.batch_size
    start = time.perf_counter()
    for step in range(cfg.train.steps):
        b = task.batch("train", step * batch_size, batch_size)
        loss = loss_fn(model(b.tokens, b.mask), b.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
    return model, time.perf_counter() - start, loss.item()


@torch.no_grad()
def evaluate(model: SelfTransformer, task: Task, n_val: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    model.eval()
    correct = total = last_correct = 0
    iters, difficulty = [], []
    fpsa = bool(model.fpsa_layers())
    for start in range(0, n_val, EVAL_BATCH):
        b = task.batch("val", start, min(EVAL_BATCH, n_val - start))
        predicted = model(b.tokens, b.mask).argmax(dim=-1)
        labelled = b.targets != IGNORE
        correct += int((predicted == b.targets)[labelled].sum())
        total += int(labelled.sum())
        hit = predicted[:, -1] == b.targets[:, -1] if task.spec.per_token else predicted == b.targets
        last_correct += int(hit.sum())
        difficulty.append(b.difficulty)
        if fpsa:
            iters.append(torch.stack([model.fpsa_example_iters(i) for i in range(len(model.blocks))]))
    model.train()
    example_iters = torch.cat(iters, dim=1) if iters else torch.empty(0, dtype=torch.int64)
    return correct / total, last_correct / n_val, example_iters, torch.cat(difficulty)


def run(cfg: Config, task: Task, attention: str, seed: int, initial: dict[str, torch.Tensor]) -> Run:
    cfg = cfg.model_copy(deep=True)
    cfg.model.attention = attention
    model, seconds, final_loss = train(cfg, task, initial)
    stats = model.fpsa_stats()  # of the last training step
    accuracy, last_accuracy, example_iters, difficulty = evaluate(model, task, cfg.data.n_val)
    return Run(attention, seed, accuracy, last_accuracy, seconds, final_loss, stats, example_iters, difficulty)


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
        row = {"low": low, "high": high, "n": int(chosen.sum()),
               "mean": [float(x.mean()) for x in per_layer],
               "median": [statistics.median(x.tolist()) for x in per_layer]}
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
        line, = ax.plot(centers, [r["mean"][i] for r in rows], marker="o", label=f"layer {i} mean")
        ax.plot(centers, [r["median"][i] for r in rows], linestyle="--", marker="x", color=line.get_color(),
                label=f"layer {i} median")
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
    lines = [f"{SECTION}\n",
             f"Command: `{command}`\n",
             f"Machine: {machine()}.\n",
             f"Task `{cfg.data.task}`, seq_len {cfg.data.seq_len}"
             + (f", max_depth {cfg.data.max_depth}" if cfg.data.task == "listops" else "")
             + f", {cfg.data.n_val} held-out examples. Model d_model={cfg.model.d_model}, {cfg.model.n_layers} "
             f"layers, {cfg.model.n_heads} heads; {cfg.train.steps} steps of batch {cfg.train.batch_size}, lr "
             f"{cfg.train.lr}. FPSA: max_iter {cfg.fpsa.max_iter}, tol {cfg.fpsa.tol}, damping "
             f"{cfg.fpsa.damping}, backward {cfg.fpsa.backward}, reinject {cfg.fpsa.reinject}, spectral_norm "
             f"{cfg.fpsa.spectral_norm}.\n",
             "| seed | attention | held-out accuracy |" + (" last-position accuracy |" if per_token else "")
             + " final train loss | train time (s) | FPSA iters/token, last step | FPSA converged, last step |",
             "|---|---|---|" + ("---|" if per_token else "") + "---|---|---|---|"]
    for r in runs:
        stats = (f"{r.fpsa_stats['fpsa/iters_mean']:.2f} | {r.fpsa_stats['fpsa/converged_frac']:.2f}"
                 if r.fpsa_stats else "- | -")
        lines.append(f"| {r.seed} | {r.attention} | {r.accuracy:.4f} |"
                     + (f" {r.last_accuracy:.4f} |" if per_token else "")
                     + f" {r.final_loss:.4f} | {r.seconds:.0f} | {stats} |")
    for attention in ("vanilla", "fpsa"):
        accs = [r.accuracy for r in runs if r.attention == attention]
        lines.append(f"\nMean held-out accuracy, {attention}: {statistics.mean(accs):.4f} over {len(accs)} seed(s).")
    lines.append("\nFPSA iterations per held-out example (until all its tokens stopped), by difficulty, all seeds:\n")
    lines.append(iters_table)
    if plot_link is not None:
        lines.append(f"![FPSA iterations against difficulty]({plot_link})\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--bins", type=int, default=8, help="at most this many difficulty bins in the table")
    parser.add_argument("--docs", type=Path, help="replace the results section of this markdown file")
    parser.add_argument("--plot", type=Path, help="write the iterations-against-difficulty plot here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, args.set)
    task = build_task(cfg.data)
    command = "bench/self_vs_vanilla.py " + " ".join(sys.argv[1:])
    print(dump_config(cfg))
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        initial = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"attention": "vanilla", "learned_temperature": False})}), task.spec).state_dict()
        for attention in ("vanilla", "fpsa"):
            r = run(cfg, task, attention, seed, initial)
            print(f"seed {seed} {attention}: accuracy {r.accuracy:.4f} last {r.last_accuracy:.4f} "
                  f"loss {r.final_loss:.4f} {r.seconds:.0f}s {r.fpsa_stats}", flush=True)
            runs.append(r)
    table, rows = iteration_table([r for r in runs if r.attention == "fpsa"], args.bins)
    if args.plot:
        plot(rows, args.plot, f"{cfg.data.task}, seq_len {cfg.data.seq_len}: FPSA iterations vs difficulty")
    plot_link = None
    if args.plot:
        plot_link = os.path.relpath(args.plot, args.docs.parent if args.docs else Path.cwd())
    text = report(cfg, runs, ".venv/bin/python " + command, table, plot_link)
    print(text)
    if args.docs:
        write_section(args.docs, text, intro="# Model\n")


if __name__ == "__main__":
    main()

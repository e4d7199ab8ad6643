"""FPSA iterations per token against per-token difficulty at a fixed sequence length (issue 16, Build 4).

Loads an FPSA run directory (config.yaml, model.pt) on a task with a per-token difficulty (s5, a5, parity,
listops), evaluates the held-out split and records, for every real token, the iterations the solver gave it
(`model.token_iterations()`: mean over layers) and its difficulty, `task.token_difficulty` (dtrain/data): on S5
and A5 the number of non-identity tokens up to and including its position (the state changes the prefix
product has been through), on parity the ones so far, on ListOps the nesting depth. It is the definition the
trainer's evaluation uses for fpsa/iters_by_token_difficulty and val/fpsa_token_iters_slope, whose slope is the
first row's point estimate here. Every sequence has data.seq_len tokens, so length plays no part. Difficulty
grows with position, so besides the plain least-squares slope of iterations on difficulty the table gives the
slope with position as a second regressor. 95% intervals come from a bootstrap over examples (tokens of one
sequence are not independent), `--boot` resamples.

    .venv/bin/python -m bench.fpsa_adaptivity runs/quickstart/allreduce --docs docs/benchmarks.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench._common import argument_parser, load, write_result
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.model import build_model

SECTION = "## FPSA iterations vs per-token difficulty (issue 16)"


def token_rows(run: Path, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per real held-out token: iterations (mean over layers), difficulty, position, and its example's index."""
    cfg = load_config(run / "config.yaml")
    task = build_task(cfg.data, run)
    if cfg.model.attention != "fpsa" or task.token_difficulty(task.batch("val", 0, 1).tokens) is None:
        sys.exit(f"fpsa_adaptivity: {run} is not an FPSA run on a task with a per-token difficulty")
    model = build_model(cfg, task.spec)
    model.load_state_dict(torch.load(run / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    rows = []
    with torch.no_grad():
        for lo in range(0, task.n_val, batch_size):
            b = task.batch("val", lo, min(batch_size, task.n_val - lo))
            model(b.tokens, b.mask)
            iters = model.token_iterations()
            difficulty = task.token_difficulty(b.tokens).double()
            position = torch.arange(b.tokens.shape[1], dtype=torch.float64).expand_as(iters)
            example = (lo + torch.arange(len(b.tokens), dtype=torch.float64))[:, None].expand_as(iters)
            real = b.mask if b.mask is not None else torch.ones_like(iters, dtype=torch.bool)
            rows.append(torch.stack([iters[real], difficulty[real], position[real], example[real]], dim=1))
    table = torch.cat(rows)
    return table[:, 0], table[:, 1], table[:, 2], table[:, 3].long()


def slopes(iters: torch.Tensor, difficulty: torch.Tensor, position: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of iterations on difficulty, alone and with position as a second regressor."""
    ones = torch.ones_like(iters)
    alone = torch.linalg.lstsq(torch.stack([ones, difficulty], 1), iters[:, None]).solution[1, 0]
    both = torch.linalg.lstsq(torch.stack([ones, difficulty, position], 1), iters[:, None]).solution[1, 0]
    return alone.item(), both.item()


def main() -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--docs", type=Path)
    args = ap.parse_args()
    loads = [load()]
    iters, difficulty, position, example = token_rows(args.run)
    point = slopes(iters, difficulty, position)
    # bootstrap over examples: resample whole sequences
    n_examples = int(example.max()) + 1
    by_example = [torch.nonzero(example == e).flatten() for e in range(n_examples)]
    gen = torch.Generator().manual_seed(0)
    boot = []
    for _ in range(args.boot):
        pick = torch.randint(n_examples, (n_examples,), generator=gen)
        idx = torch.cat([by_example[e] for e in pick.tolist()])
        boot.append(slopes(iters[idx], difficulty[idx], position[idx]))
    boot_t = torch.tensor(boot, dtype=torch.float64)
    lo, hi = torch.quantile(boot_t, 0.025, dim=0).tolist(), torch.quantile(boot_t, 0.975, dim=0).tolist()
    loads.append(load())
    lines = [
        "| regression | slope (iterations per unit of difficulty) | 95% CI (bootstrap over examples) |",
        "|---|---|---|",
        f"| iterations ~ difficulty | {point[0]:.4f} | [{lo[0]:.4f}, {hi[0]:.4f}] |",
        f"| iterations ~ difficulty + position | {point[1]:.4f} | [{lo[1]:.4f}, {hi[1]:.4f}] |",
    ]
    means = ["| difficulty | tokens | mean iterations |", "|---|---|---|"]
    for d in sorted({int(x) for x in difficulty.tolist()}):
        sel = difficulty == d
        means.append(f"| {d} | {int(sel.sum())} | {iters[sel].mean().item():.2f} |")
    table, by_difficulty = "\n".join(lines), "\n".join(means)
    print(table + "\n\n" + by_difficulty)
    if args.docs:
        cfg = load_config(args.run / "config.yaml")
        write_result(
            args.docs,
            SECTION,
            f"Checkpoint `{args.run}` (`{cfg.data.task}`, seq_len {cfg.data.seq_len}, {n_examples} held-out "
            f"examples, {len(iters)} tokens); iterations are per token, mean over the {cfg.model.n_layers} layers; "
            f"{args.boot} bootstrap resamples.",
            loads,
            table,
            "",
            by_difficulty,
        )


if __name__ == "__main__":
    main()

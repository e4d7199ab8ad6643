"""rank-dAD compute overhead: compression time against backward time, and factored vs dense iteration.

For a stack of `layers` Linear(d, d) layers fed N rows (batch × tokens):

- backward (plain): ordinary autograd backward of the stack (forms every d×d weight gradient);
- backward (captured): the same with dAD capture (no weight gradients formed, (A, Δ) recorded);
- compress: rank-dAD's local stage on the captured pairs (subspace iteration, rank k, `iters` steps), all layers,
  plus the two-way recompression of S = 4 ranks' gathered factors (exact truncated SVD from the factors);
- one layer's rank-k factorisation through products with (A, Δ) (never forming d×d) against forming the dense
  gradient Δᵀ A first and iterating on it (what the reference rank-dAD does when N ≥ in).

Times are the best of `repeats` runs (the least disturbed by other processes), in milliseconds. CPU sizes are
small (d = 128…256); with CUDA the GPU sizes (d = 768…1024, N = 4k…64k) run too. Writes the table to
docs/bench_rankdad_overhead.md.

    .venv/bin/python -m bench.rankdad_overhead [--repeats 10] [--out docs/bench_rankdad_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dtrain.compression.capture import attach_linears
from dtrain.compression.lowrank import Dense, OuterProduct, random_start, subspace_iteration, truncate

CPU_CASES = [(128, 1024), (128, 4096), (256, 1024), (256, 4096)]  # (d, N)
GPU_CASES = [(768, 4096), (768, 16384), (768, 65536), (1024, 4096), (1024, 16384), (1024, 65536)]
SIMULATED_RANKS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels, lazy init)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _stack(d: int, layers: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(layers)]).to(device)


def _backward_ms(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Backward only: the forward of each repeat runs outside the timed region."""
    times = []
    for i in range(repeats + 1):
        loss = model(x).square().mean()
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        _sync(device)
        if i:  # the first is a warm-up
            times.append((time.perf_counter() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
    return min(times)


def measure(d: int, n: int, k: int, iters: int, layers: int, device: torch.device, repeats: int) -> dict[str, float]:
    x = torch.randn(n, d, device=device, requires_grad=True)
    plain = _stack(d, layers, device)
    backward_plain = _backward_ms(plain, x, device, repeats)

    captured = _stack(d, layers, device)
    captures = attach_linears(captured)
    backward_captured = _backward_ms(captured, x, device, repeats)
    for c in captures:
        c.take()  # drop the timed passes' pairs: keep exactly one backward's N rows
    captured(x).square().mean().backward()
    pairs = [c.take() for c in captures]
    for c in captures:
        c.remove()

    starts = [random_start(d, k, seed=i, like=pairs[0][0]) for i in range(layers)]

    def compress() -> None:
        for (a, delta), start in zip(pairs, starts):
            p, q = subspace_iteration(OuterProduct(delta, a), start, iters)
            truncate(torch.cat([p] * SIMULATED_RANKS, dim=1), torch.cat([q] * SIMULATED_RANKS, dim=1), k)

    a, delta = pairs[0]
    factored = _best_ms(lambda: subspace_iteration(OuterProduct(delta, a), starts[0], iters), device, repeats)
    dense = _best_ms(lambda: subspace_iteration(Dense(delta.T @ a), starts[0], iters), device, repeats)
    return {
        "backward_plain": backward_plain,
        "backward_captured": backward_captured,
        "compress": _best_ms(compress, device, repeats),
        "factored": factored,
        "dense": dense,
    }


def table(rows: list[tuple[str, int, int, dict[str, float]]], k: int, iters: int, layers: int) -> str:
    lines = [
        f"rank k = {k}, {iters} power iteration(s), {layers} Linear(d, d) layers; compress = local stage of all "
        f"layers + two-way recompression of {SIMULATED_RANKS} ranks' factors; times in ms (best of repeats)",
        "",
        "| device | d | N rows | backward plain | backward captured | compress | compress / backward plain "
        "| 1 layer: dense ΔᵀA + iterate | 1 layer: factored | dense / factored |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for device, d, n, m in rows:
        lines.append(
            f"| {device} | {d} | {n} | {m['backward_plain']:.2f} | {m['backward_captured']:.2f} | {m['compress']:.2f} "
            f"| {m['compress'] / m['backward_plain']:.2f} | {m['dense']:.2f} | {m['factored']:.2f} "
            f"| {m['dense'] / m['factored']:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 1 by default because oversubscribed OpenMP threads on a shared machine "
        "make thin matrix products 100x slower and the figures meaningless",
    )
    ap.add_argument("--out", default="docs/bench_rankdad_overhead.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    cpu = torch.device("cpu")
    for d, n in CPU_CASES:
        rows.append(("cpu", d, n, measure(d, n, args.rank, args.iters, args.layers, cpu, args.repeats)))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name(gpu)
        for d, n in GPU_CASES:
            rows.append((name, d, n, measure(d, n, args.rank, args.iters, args.layers, gpu, args.repeats)))
    else:
        print("no CUDA device: GPU cases (d = 768…1024, N = 4k…64k) skipped")

    text = table(rows, args.rank, args.iters, args.layers)
    print(text)
    header = (
        f"# rank-dAD compute overhead\n\nGenerated by `python -m bench.rankdad_overhead` (torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} of "
        f"{os.cpu_count()} CPU threads; best of repeats, which on a shared machine is the least disturbed run)."
        "\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + text + "\n")


if __name__ == "__main__":
    main()

"""The performance half of `bench.gpu_check`: every figure with its target and whether it was met.

- rank-dAD's power iteration through the captured factors (`lowrank.OuterProduct`: Δᵀ(A v), never out×in)
  against forming the dense gradient Δᵀ A first and iterating on it (`lowrank.Dense`, what the codec does with
  error feedback), one layer, the project's own `subspace_iteration`; target: the factored form faster from
  `Sizes.target_rows` rows per rank on;
- rank-dAD's compression (the strategy's `synchronize`) as a share of the plain backward of the benchmark model
  at BERT-base widths (`bench.rankdad_model_overhead.measure`); target ≤ 10% from `Sizes.target_rows` rows on;
- FPSA's training step (implicit and phantom backward, solver forced to n iterations) against vanilla
  attention (`bench.fpsa_step_time`), target ≤ 1.6× at 3 to 6 iterations, and its memory at two max_iter
  values, target flat (≤ 1.2× from the low to the high max_iter). Memory on a GPU: the step's peak allocation
  above what was allocated before it (`torch.cuda.max_memory_allocated`); everywhere: the bytes autograd saves
  for backward (`bench.fpsa_memory.saved_bytes`), the only figure of the two that a CPU dry run has.

Times are medians over repeats, taken by `bench._timing.Timer` (CUDA events on a GPU, the wall clock in a dry run).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from bench import fpsa_step_time, rankdad_model_overhead
from bench._common import ROOT, to_device
from bench._timing import Timer
from bench.fpsa_memory import saved_bytes
from dtrain.compression.lowrank import Dense, OuterProduct, random_start, subspace_iteration
from dtrain.config import CommConfig, load_config
from dtrain.trainer import loss_fn

MIB = 2**20
MEMORY_FLAT_TARGET = 1.2  # memory at the high max_iter / at the low one (bench.fpsa_memory's target)
STEP_TIME_TARGET_ITERS = range(3, 7)  # the iteration counts the 1.6× step-time target is stated for


@dataclass(frozen=True)
class Sizes:
    layers: tuple[tuple[int, int], ...]  # (in, out) of the one-layer factored-vs-dense case
    rows: tuple[int, ...]  # N, rows per rank
    ranks: tuple[int, ...]  # k
    target_rows: int  # targets on rank-dAD's speed apply from this N on
    config: str  # the benchmark model: base config, and the overrides that size it
    sets: tuple[str, ...]
    share_batches: tuple[int, ...]  # examples per step of the compression-share runs (× seq_len rows)
    fpsa_batch: int
    fpsa_iters: tuple[int, int]  # forced iterations: the low (timed against its target) and the high max_iter
    repeats: int


GPU = Sizes(
    layers=((768, 3072), (1024, 4096)),
    rows=(8192, 16384, 32768, 65536),
    ranks=(4, 8),
    target_rows=16384,
    config="configs/bench/s5_d256.yaml",
    # BERT-base widths (d_model 768, 12 heads, sequence 512) at 4 blocks: a share and a ratio do not depend on depth
    sets=("model.d_model=768", "model.n_heads=12", "model.n_layers=4", "data.seq_len=512"),
    share_batches=(32, 64),  # 16k and 32k rows per layer
    fpsa_batch=8,
    fpsa_iters=(4, 16),
    repeats=10,
)
DRY_RUN = Sizes(
    layers=((16, 64),),
    rows=(64, 256),
    ranks=(2,),
    target_rows=256,
    config="tests/configs/tiny.yaml",
    sets=(),
    share_batches=(8, 32),  # × 8 tokens: 64 and 256 rows
    fpsa_batch=4,
    fpsa_iters=(2, 4),
    repeats=2,
)


def verdict(value: float, target: float | None, at_most: bool = True) -> bool | None:
    """Whether `value` met `target`: value ≤ target when `at_most`, else value > target; None where no target
    applies."""
    if target is None:
        return None
    return value <= target if at_most else value > target


def _factored(delta: torch.Tensor, a: torch.Tensor, start: torch.Tensor, iters: int) -> object:
    return subspace_iteration(OuterProduct(delta, a), start, iters)


def _dense(delta: torch.Tensor, a: torch.Tensor, start: torch.Tensor, iters: int) -> object:
    return subspace_iteration(Dense(delta.T @ a), start, iters)


def factored_vs_dense(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    timer, iters = Timer(device), CommConfig().power_iters
    rows_out = []
    for in_features, out_features in sizes.layers:
        for n in sizes.rows:
            gen = torch.Generator(device=device).manual_seed(n)
            a = torch.randn(n, in_features, generator=gen, device=device)
            delta = torch.randn(n, out_features, generator=gen, device=device)
            for k in sizes.ranks:
                start = random_start(in_features, k, seed=0, like=a)
                factored = timer.median(partial(_factored, delta, a, start, iters), sizes.repeats)
                dense = timer.median(partial(_dense, delta, a, start, iters), sizes.repeats)
                speedup = dense / factored
                target = 1.0 if n >= sizes.target_rows else None
                rows_out.append(
                    {
                        "in": in_features,
                        "out": out_features,
                        "rows": n,
                        "k": k,
                        "power_iters": iters,
                        "factored_ms": 1e3 * factored,
                        "dense_ms": 1e3 * dense,
                        "dense_over_factored": speedup,
                        "target": target,
                        "met": verdict(speedup, target, at_most=False),
                    }
                )
            del a, delta
    return rows_out


def compression_share(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    med = statistics.median
    out = []
    seq_len = load_config(ROOT / sizes.config, list(sizes.sets)).data.seq_len
    for batch in sizes.share_batches:
        times = rankdad_model_overhead.measure(sizes.config, list(sizes.sets), batch, sizes.repeats, device)
        plain = med(times["plain"]["backward"])
        rows = batch * seq_len
        target = rankdad_model_overhead.TARGET if rows >= sizes.target_rows else None
        for name in rankdad_model_overhead.VARIANTS:
            backward, compress = med(times[name]["backward"]), med(times[name]["compress"])
            share = compress / plain
            out.append(
                {
                    "variant": name,
                    "rows": rows,
                    "plain_backward_ms": 1e3 * plain,
                    "captured_backward_ms": 1e3 * backward,
                    "compress_ms": 1e3 * compress,
                    "share": share,
                    "net": (backward + compress) / plain - 1,
                    "target": target,
                    "met": verdict(share, target),
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next batch size's models start from a clean pool
    return out


def _peak_step_bytes(variant: tuple, batch: Any) -> int:
    """A training step's peak CUDA allocation above what was allocated before it."""
    _, task, model, opt = variant
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fpsa_step_time.train_step(task, model, opt, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _saved_bytes(variant: tuple, batch: Any) -> int:
    _, task, model, _ = variant
    nbytes = saved_bytes(lambda: loss_fn(model(batch.tokens, batch.mask), batch.targets, task.spec.targets_per_example))
    model.zero_grad(set_to_none=True)
    return nbytes


def fpsa(sizes: Sizes, device: torch.device) -> dict[str, list[dict[str, Any]]]:
    low, high = sizes.fpsa_iters
    variants = fpsa_step_time.make_variants(
        sizes.config, list(sizes.sets), ["implicit", "phantom"], [low, high], device
    )
    task = variants["vanilla"][1]
    b = sizes.fpsa_batch
    batches = [to_device(task.batch("train", i * b, b), device) for i in range(2)]
    times, iters, adj_iters = fpsa_step_time.run_rounds(variants, batches, sizes.repeats, Timer(device))
    med = statistics.median
    step_rows, memory = [], {}
    for name, variant in variants.items():
        ratio = med(a / v for a, v in zip(times[name], times["vanilla"]))
        n = int(name.split("n=")[1]) if "n=" in name else None  # make_variants' names: "fpsa implicit n=4"
        target = fpsa_step_time.TARGET if n in STEP_TIME_TARGET_ITERS else None  # vanilla: none
        peak = _peak_step_bytes(variant, batches[0]) if device.type == "cuda" else None
        memory[name] = {
            "peak_step_mib": None if peak is None else peak / MIB,
            "saved_mib": _saved_bytes(variant, batches[0]) / MIB,
        }
        step_rows.append(
            {
                "model": name,
                "solver_iters": med(iters[name]) if iters[name] else None,
                "adjoint_iters": med(adj_iters[name]) if adj_iters[name] else None,
                "step_ms": 1e3 * med(times[name]),
                "over_vanilla": ratio,
                "target": target,
                "met": verdict(ratio, target),
                **memory[name],
            }
        )
    flat_rows = []
    for backward in ("implicit", "phantom"):
        lo, hi = memory[f"fpsa {backward} n={low}"], memory[f"fpsa {backward} n={high}"]
        figure = "peak_step_mib" if device.type == "cuda" else "saved_mib"
        ratio = hi[figure] / lo[figure]
        flat_rows.append(
            {
                "backward": backward,
                "max_iter": [low, high],
                "figure": figure,
                "low_mib": lo[figure],
                "high_mib": hi[figure],
                "high_over_low": ratio,
                "target": MEMORY_FLAT_TARGET,
                "met": verdict(ratio, MEMORY_FLAT_TARGET),
            }
        )
    return {"step": step_rows, "memory_vs_max_iter": flat_rows}

"""The science table: vanilla attention, SELF (fixed-point attention) and a compute-matched control, 3 seeds each.

Three models per task, all built and trained by the library's trainer at world size 1 (one process), with the
pieces of bench/self_vs_vanilla.py (its run_config, check_same_start, train_and_measure):
- vanilla: model.attention=vanilla, the same parameters as the other two;
- SELF: model.attention=fpsa with the converging settings of configs/quickstart.yaml (Anderson-accelerated
  undamped solve to tol 2e-5, at most 12 iterations, Jacobian penalty 4, implicit backward);
- control: the same FPSA layer as a fixed loop, `control_overrides(N)`: fpsa.backward=bptt, damping 1, no
  Anderson, no Jacobian penalty, and tol 1e-30, which no float32 residual meets unless F(Z) = Z bitwise, so
  every token runs exactly N iterations Z_{k+1} = X + Attn(Z_k), Z_0 = X (V = W_V X, as in SELF's map), trained
  by backpropagation through all N. N = SELF's mean iterations per token (mean over layers and seeds) at its last
  training step on that task, rounded up, so the control runs after SELF's seeds.
All three start from identical initial parameters (checked), see the same batches for the same steps and are
evaluated on the same held-out set. S5 and A5 use sinusoidal positions (model.positions=sinusoidal) in all three
models, so the same trained models are also evaluated at twice the training length; the other tasks keep learned
positions. text_mlm is masked-LM on real English text: Debian's license texts (/usr/share/common-licenses), which
the benchmark copies as .txt under --out itself (`license_corpus`); its accuracy is the held-out masked-token
accuracy, and the report adds the held-out perplexity and a context-free (unigram) baseline. Each run keeps its
directory under --out (TASK/MODEL/ATTENTION-sSEED) with a result.json; a rerun
reuses finished runs (a partial one is redone), and --collect only renders the table from what has finished.

    .venv/bin/python -m bench.science_table --docs docs/results_self.md
    .venv/bin/python -m bench.science_table --collect --docs docs/results_self.md

--models trains only some of the three, --n-from names the SELF seeds whose iterations give the control's N
(default: --seeds; those SELF runs are reused when finished, else trained first). So one process per seed side by
side: `--tasks text_mlm --seeds 0 --models vanilla self` for each seed, then `--tasks text_mlm --seeds 0 --models
control --n-from 0 1 2` for each seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats

from bench._common import command_line, load_note, machine, write_section
from bench.self_vs_vanilla import check_same_start, run_config, train_and_measure
from dtrain import metrics
from dtrain.config import Config
from dtrain.data import IGNORE, Task, build_task
from dtrain.data.text import TOKENIZER_FILE
from dtrain.distributed import DistEnv, init_distributed, shutdown
from dtrain.metrics import read_metrics
from dtrain.model import build_model
from dtrain.trainer import Trainer, evaluate

SECTION = "## The table"
INTRO = "# SELF vs vanilla vs a compute-matched control\n"
MODELS = ("vanilla", "self", "control")
# the same small model, optimiser and evaluation for every task
COMMON = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.dropout=0.0",
    "train.batch_size=64",
    "train.lr=3e-3",
    "train.warmup_steps=20",
    "data.n_val=512",
    "data.workers=0",
    "checkpoint.every=0",
]
# configs/quickstart.yaml's FPSA settings, under which the fixed point is reached
SELF_FPSA = [
    "fpsa.max_iter=12",
    "fpsa.tol=2e-5",
    "fpsa.damping=1.0",
    "fpsa.anderson_memory=5",
    "fpsa.jac_reg=4.0",
    "fpsa.backward=implicit",
    "fpsa.adj_tol=1e-6",
]
CONTROL_TOL = 1e-30  # fpsa.tol must be > 0; no float32 relative residual is below this unless it is exactly 0


LICENSES = Path("/usr/share/common-licenses")  # Debian's license texts: the real English text of text_mlm


def license_corpus(dest: Path, source: Path = LICENSES) -> Path:
    """text_mlm's corpus: every file of `source` (links followed) copied byte for byte as NAME.txt into `dest`, with
    the source's modification time, so a rerun (or a fresh machine) finds the same files and dtrain's cache keys
    (path, size, mtime) do not change; a .txt in `dest` that `source` lacks is removed. One-line error without it."""
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    if not files:
        raise SystemExit(
            f"text_mlm: {source} is missing or empty (its license texts are this task's corpus; Debian and Ubuntu "
            "ship them in base-files); run the other tasks with --tasks"
        )
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {f"{p.name}.txt" for p in files}
    for extra in dest.glob("*.txt"):
        if extra.name not in wanted:
            extra.unlink()
    for src in files:
        dst = dest / f"{src.name}.txt"
        data = src.read_bytes()
        if not dst.is_file() or dst.read_bytes() != data:
            tmp = dst.with_name(f"{dst.name}.{os.getpid()}.part")  # parallel processes may copy at once
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        stat = src.stat()
        if dst.stat().st_mtime_ns != stat.st_mtime_ns:
            os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return dest


def text_mlm_data(out: Path) -> list[str]:
    """The text task's source, set up under the benchmark's --out."""
    return [f"data.path={license_corpus(out / 'text_mlm' / 'corpus')}"]


@dataclass(frozen=True)
class TaskSetup:
    sets: list[str]
    steps: int
    lengths: tuple[int, ...] = ()  # evaluation lengths (the first = training length); () = the task's own only
    data: Callable[[Path], list[str]] | None = None  # more overrides, from the --out directory (a corpus it makes)


TASKS: dict[str, TaskSetup] = {
    "s5": TaskSetup(["data.task=s5", "data.seq_len=8", "model.positions=sinusoidal"], 500, (8, 16)),
    "a5": TaskSetup(["data.task=a5", "data.seq_len=8", "model.positions=sinusoidal"], 500, (8, 16)),
    "parity": TaskSetup(["data.task=parity", "data.seq_len=16"], 400),
    "listops": TaskSetup(["data.task=listops", "data.seq_len=32", "data.max_depth=3"], 300),
    "digits": TaskSetup(["data.task=digits", "data.patch=2", "data.shift=1", "data.n_val=359"], 400),
    # masked-LM on real English text (license_corpus): byte-level BPE, whose training is deterministic (WordPiece's
    # breaks ties differently from one training to the next, docs/data.md), blocks of 64 tokens, 15% masked
    "text_mlm": TaskSetup(
        [
            "data.task=text",
            "data.objective=mlm",
            "data.tokenizer_kind=bpe",
            "data.vocab_size=1024",
            "data.seq_len=64",
        ],
        200,
        data=text_mlm_data,
    ),
}


def control_overrides(n_iter: int) -> list[str]:
    """FPSA as vanilla attention looped n_iter times with shared weights, trained by BPTT (after SELF_FPSA)."""
    return [
        "fpsa.backward=bptt",
        "fpsa.damping=1.0",
        f"fpsa.tol={CONTROL_TOL}",
        "fpsa.anderson_memory=0",
        "fpsa.jac_reg=0.0",
        f"fpsa.max_iter={n_iter}",
    ]


def model_overrides(model: str, n_iter: int | None = None) -> list[str]:
    if model == "vanilla":
        return []
    if model == "self":
        return list(SELF_FPSA)
    assert model == "control" and n_iter is not None, (model, n_iter)
    return [*SELF_FPSA, *control_overrides(n_iter)]


def control_iterations(self_iters: list[float]) -> int:
    """N: SELF's mean iterations per token (one value per seed), rounded up (float noise below 1e-6 ignored)."""
    return max(1, math.ceil(round(statistics.mean(self_iters), 6)))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean (half-width nan for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    t = float(scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


@torch.no_grad()
def held_out_iterations(model: torch.nn.Module, task: Task, cfg: Config, device: torch.device) -> float:
    """Mean FPSA iterations per real token (mean over layers) on the held-out set; nan for vanilla."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, task.n_val, cfg.eval.batch_size):
        b = task.batch("val", start, min(cfg.eval.batch_size, task.n_val - start))
        model(b.tokens.to(device), b.mask.to(device))
        stats = model.fpsa_stats()
        if not stats:
            model.train(was_training)
            return math.nan
        real = float(b.mask.sum())
        total += stats[metrics.FPSA_ITERS_MEAN] * real
        count += real
    model.train(was_training)
    return total / count


def initial_state(cfg: Config, task: Task) -> dict[str, torch.Tensor]:
    """The vanilla model's initial parameters, drawn as the trainer draws them (seed, then build)."""
    vanilla = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attention": "vanilla"})})
    torch.manual_seed(cfg.train.seed)
    return build_model(vanilla, task.spec).state_dict()


def train_one(task_name: str, model: str, seed: int, out: Path, env: DistEnv, steps: int, n_iter: int | None) -> dict:
    """One run, or its result.json when it finished before."""
    setup = TASKS[task_name]
    attention = "vanilla" if model == "vanilla" else "fpsa"
    parent = out / task_name / model
    run_dir = parent / f"{attention}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run that did not finish: redo it
    data = setup.data(out) if setup.data else []  # only a run to train needs the corpus
    overrides = [*COMMON, *setup.sets, *data, f"train.steps={steps}", *model_overrides(model, n_iter)]
    cfg = run_config(overrides, attention, seed, parent)
    load_before = os.getloadavg()[0]
    trainer = Trainer(cfg, env)
    if model != "vanilla":
        check_same_start(trainer.model, initial_state(cfg, trainer.task))
    run = train_and_measure(trainer)
    load_after = os.getloadavg()[0]
    lengths = setup.lengths or (trainer.task.spec.seq_len,)
    accuracy, iters = {}, {}
    for length in lengths:
        task = (
            trainer.task
            if length == trainer.task.spec.seq_len
            else build_task(cfg.data.model_copy(update={"seq_len": length}))
        )
        accuracy[str(length)] = run.accuracy if task is trainer.task else evaluate(trainer.model, task, cfg, env).acc
        iters[str(length)] = held_out_iterations(trainer.model, task, cfg, env.device)
    result = {
        "task": task_name,
        "model": model,
        "seed": seed,
        "steps": steps,
        "n_iter": n_iter,
        "accuracy": accuracy,
        "held_out_iters": iters,
        "train_iters": run.fpsa_stats.get(metrics.FPSA_ITERS_MEAN, math.nan),
        "converged_frac": run.fpsa_stats.get(metrics.FPSA_CONVERGED_FRAC, math.nan),
        "seconds": run.seconds,
        "final_loss": run.final_loss,
        "load": [load_before, load_after],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    summary = json.loads((run_dir / metrics.SUMMARY_FILE).read_text())
    if metrics.FINAL_VAL_PERPLEXITY in summary:  # masked-LM: exp(mean cross-entropy of the held-out masked tokens)
        result["perplexity"] = {str(trainer.task.spec.seq_len): summary[metrics.FINAL_VAL_PERPLEXITY]}
    if cfg.data.task == "text":
        result["corpus"] = text_corpus_facts(trainer.task, Path(cfg.data.path), run_dir)
    done.write_text(json.dumps(result, indent=1))
    return result


def text_corpus_facts(task: Task, corpus: Path, run_dir: Path) -> dict:
    """What the text runs trained on, for the report (and to see that every run had the same tokenizer)."""
    files = sorted(corpus.glob("*.txt"))
    tokenizer = (run_dir / TOKENIZER_FILE).read_text()
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "train_blocks": len(task.train.tokens),
        "val_blocks": task.n_val,
        "masked_per_block": task.n_masked,
        "vocab": task.spec.vocab_size,
        "tokenizer_sha256": hashlib.sha256(tokenizer.encode()).hexdigest(),
        **dict(zip(("unigram_acc", "unigram_perplexity"), unigram_baseline(task))),
    }


def unigram_baseline(task: Task) -> tuple[float, float]:
    """What a masked-LM reaches without reading any context: the held-out masked-token accuracy of always
    predicting the training split's most frequent token, and the perplexity of the training split's unigram
    distribution (add-one smoothed) on the same held-out targets."""
    counts = np.bincount(np.asarray(task.train.tokens).ravel(), minlength=task.spec.vocab_size).astype(np.float64)
    log_p = np.log((counts + 1) / (counts.sum() + len(counts)))
    targets = np.concatenate(
        [task.batch("val", s, min(256, task.n_val - s)).targets.numpy().ravel() for s in range(0, task.n_val, 256)]
    )
    targets = targets[targets != IGNORE]
    return float((targets == counts.argmax()).mean()), float(np.exp(-log_p[targets].mean()))


def median_step_ms(run_dir: Path) -> float:
    """The median of the trainer's per-step times (time/step_s) in ms: less moved by bursts of load from other
    jobs than the total."""
    steps = [row[metrics.TIME_STEP_S] for row in read_metrics(run_dir) if metrics.TIME_STEP_S in row]
    return 1000 * statistics.median(steps) if steps else math.nan


def collect(out: Path) -> list[dict]:
    """Every finished run under `out`, with its median step time."""
    results = []
    for path in sorted(out.glob("*/*/*/result.json")):
        result = json.loads(path.read_text())
        result["step_ms"] = median_step_ms(path.parent)
        results.append(result)
    return results


@dataclass
class Row:
    task: str
    length: str
    model: str
    accuracies: list[float]
    iters: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # empty: the same runs as the row above
    step_ms: list[float] = field(default_factory=list)  # median step time of each run, ms (as seconds)


def table_rows(results: list[dict]) -> list[Row]:
    rows = []
    for task in sorted({r["task"] for r in results}, key=lambda t: list(TASKS).index(t) if t in TASKS else len(TASKS)):
        of_task = [r for r in results if r["task"] == task]
        lengths = sorted({int(k) for r in of_task for k in r["accuracy"]})
        for i, length in enumerate(lengths):
            for model in MODELS:
                runs = sorted(
                    (r for r in of_task if r["model"] == model and str(length) in r["accuracy"]),
                    key=lambda r: r["seed"],
                )
                if runs:
                    rows.append(
                        Row(
                            task,
                            str(length),
                            model,
                            [r["accuracy"][str(length)] for r in runs],
                            [r["held_out_iters"][str(length)] for r in runs],
                            [r["seconds"] for r in runs] if i == 0 else [],
                            [r.get("step_ms", math.nan) for r in runs] if i == 0 else [],
                        )
                    )
    return rows


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def render_table(rows: list[Row]) -> str:
    lines = [
        "| task | length | model | held-out accuracy, mean ± 95% CI | per seed | mean iterations per token "
        "(held-out) | train time per run (s) | × vanilla | median step (ms) | × vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    vanilla_s = {r.task: statistics.mean(r.seconds) for r in rows if r.model == "vanilla" and r.seconds}
    vanilla_ms = {r.task: statistics.mean(r.step_ms) for r in rows if r.model == "vanilla" and r.step_ms}
    for r in rows:
        mean, half = t_interval(r.accuracies)
        ci = f"{mean:.3f} ± {half:.3f}" if not math.isnan(half) else f"{mean:.3f}"
        per_seed = " / ".join(f"{a:.3f}" for a in r.accuracies)
        iters = _finite(r.iters)
        it = f"{statistics.mean(iters):.2f}" if iters else "1 (one pass)"
        if r.seconds:
            secs = statistics.mean(r.seconds)
            ratio = f"{secs / vanilla_s[r.task]:.2f}" if r.task in vanilla_s else "-"
            ms = statistics.mean(r.step_ms) if r.step_ms else math.nan
            ms_ratio = f"{ms / vanilla_ms[r.task]:.2f}" if r.task in vanilla_ms else "-"
            timing = f"{secs:.1f} | {ratio} | {ms:.1f} | {ms_ratio}"
        else:
            timing = "(same runs) | | | "
        lines.append(f"| {r.task} | {r.length} | {r.model} | {ci} | {per_seed} | {it} | {timing} |")
    return "\n".join(lines) + "\n"


def render_paired(results: list[dict]) -> str:
    """Per task and length: (model - vanilla) accuracy seed by seed (same initial parameters and batches), mean
    ± 95% CI of the paired differences."""
    lines = [
        "| task | length | model − vanilla | mean ± 95% CI | per seed |",
        "|---|---|---|---|---|",
    ]
    for row in table_rows(results):
        if row.model == "vanilla":
            continue
        of = {(r["model"], r["seed"]): r["accuracy"].get(row.length) for r in results if r["task"] == row.task}
        seeds = sorted(s for m, s in of if m == row.model and of.get(("vanilla", s)) is not None)
        diffs = [of[(row.model, s)] - of[("vanilla", s)] for s in seeds]
        if not diffs:
            continue
        mean, half = t_interval(diffs)
        ci = f"{mean:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{mean:+.3f}"
        lines.append(
            f"| {row.task} | {row.length} | {row.model} | {ci} | " + " / ".join(f"{d:+.3f}" for d in diffs) + " |"
        )
    return "\n".join(lines) + "\n"


def render_perplexity(results: list[dict]) -> str:
    """The tasks that report a held-out perplexity (masked-LM): per model, mean ± 95% CI over seeds, per seed,
    and the paired difference against the vanilla run of the same seed; "" when no run has one."""
    with_ppl = [r for r in results if r.get("perplexity")]
    if not with_ppl:
        return ""
    lines = [
        "| task | length | model | held-out perplexity, mean ± 95% CI | per seed | − vanilla (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for row in table_rows(with_ppl):
        of = {(r["model"], r["seed"]): r["perplexity"].get(row.length) for r in with_ppl if r["task"] == row.task}
        values = sorted((s, p) for (m, s), p in of.items() if m == row.model and p is not None)
        mean, half = t_interval([p for _, p in values])
        paired = ""
        if row.model != "vanilla":
            diffs = [p - of[("vanilla", s)] for s, p in values if of.get(("vanilla", s)) is not None]
            if diffs:
                d_mean, d_half = t_interval(diffs)
                paired = f"{d_mean:+.1f} ± {d_half:.1f}" if not math.isnan(d_half) else f"{d_mean:+.1f}"
        ci = f"{mean:.1f} ± {half:.1f}" if not math.isnan(half) else f"{mean:.1f}"
        per_seed = " / ".join(f"{p:.1f}" for _, p in values)
        lines.append(f"| {row.task} | {row.length} | {row.model} | {ci} | {per_seed} | {paired} |")
    return "\n".join(lines) + "\n"


def corpus_note(results: list[dict]) -> str:
    """One sentence on the text runs' corpus and tokenizer, and the context-free baseline; "" without text runs."""
    facts = [r["corpus"] for r in results if r.get("corpus")]
    if not facts:
        return ""
    f = facts[0]
    length = next(iter(next(r for r in results if r.get("corpus"))["accuracy"]))
    same = all(x["tokenizer_sha256"] == f["tokenizer_sha256"] for x in facts)
    return (
        f"text_mlm: the {f['files']} license texts of Debian's `{LICENSES}` (links followed), copied as .txt "
        f"({f['bytes']:,} bytes; a paragraph is a document, a keyed hash holds out data.val_fraction = 10% of "
        f"them); byte-level BPE vocabulary {f['vocab']:,} trained on the training paragraphs "
        f"(sha256 {f['tokenizer_sha256'][:12]}, "
        + ("the same in every run" if same else "NOT the same in every run")
        + f"); {f['train_blocks']:,} training blocks and {f['val_blocks']} held-out blocks of {length} tokens, "
        f"{f['masked_per_block']} masked per block (80% [MASK], 10% random, 10% kept; the held-out masks fixed). "
        "Its accuracy is the masked-token accuracy on the held-out blocks; predicting the training split's most "
        f"frequent token everywhere scores {f['unigram_acc']:.3f}, and its unigram distribution has held-out "
        f"perplexity {f['unigram_perplexity']:.1f}.\n"
    )


def report(results: list[dict], command: str) -> str:
    loads = [x for r in results for x in r["load"]]
    results = sorted(results, key=lambda r: list(TASKS).index(r["task"]) if r["task"] in TASKS else len(TASKS))
    n_iter = {r["task"]: r["n_iter"] for r in results if r["model"] == "control"}
    self_iters = {
        task: statistics.mean(r["train_iters"] for r in results if r["task"] == task and r["model"] == "self")
        for task in n_iter
    }
    steps = {r["task"]: r["steps"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    parts = [
        f"{SECTION}\n",
        f"Command: `{command}`\n",
        f"Machine: {machine()}; {load_note(loads)} (sampled before and after each run).\n",
        "Model d_model 32, 2 layers, 4 heads, batch 64, lr 3e-3 (AdamW, 20 warm-up steps, cosine), seeds "
        + ", ".join(map(str, seeds))
        + "; steps per task: "
        + ", ".join(f"{t} {s}" for t, s in steps.items())
        + " (equal for the three models of a task). Control iterations N (SELF's mean iterations per token at its "
        "last training step, mean over seeds, rounded up): "
        + (", ".join(f"{t} {n} (from {self_iters[t]:.2f})" for t, n in n_iter.items()) or "none yet")
        + ". Train time: the trainer's training steps only (evaluation excluded), one thread per run; median "
        "step: the median of the run's per-step times, averaged over seeds; × vanilla: ratio of the means over "
        "seeds.\n",
        render_table(table_rows(results)),
        "Paired differences (each seed's model against the vanilla run of the same seed: same initial parameters "
        "and batches):\n",
        render_paired(results),
    ]
    if ppl := render_perplexity(results):
        parts += ["Held-out perplexity (exp of the mean cross-entropy of the masked tokens):\n", ppl]
    if note := corpus_note(results):
        parts.append(note)
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS),
        help="train only these (e.g. vanilla and self in parallel processes, one per seed, then the control)",
    )
    parser.add_argument(
        "--n-from",
        nargs="+",
        type=int,
        metavar="SEED",
        help="the SELF seeds whose iterations give the control's N (default: --seeds), so that processes each "
        "training one seed's control use the N of all seeds",
    )
    parser.add_argument("--steps", type=int, help="training steps for every task (default: the task's own)")
    parser.add_argument("--collect", action="store_true", help="only render the finished runs under --out")
    parser.add_argument("--docs", type=Path, help="replace the table section of this markdown file")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/science_table"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.collect:
        env = init_distributed()
        for task in args.tasks:
            steps = args.steps or TASKS[task].steps
            for seed in args.seeds:
                for model in ("vanilla", "self"):
                    if model in args.models:
                        print(json.dumps(train_one(task, model, seed, args.out, env, steps, None)), flush=True)
            if "control" not in args.models:
                continue
            # SELF's runs of these seeds (the finished ones reused, the others trained here)
            self_runs = [train_one(task, "self", s, args.out, env, steps, None) for s in args.n_from or args.seeds]
            n_iter = control_iterations([r["train_iters"] for r in self_runs])
            for seed in args.seeds:
                print(json.dumps(train_one(task, "control", seed, args.out, env, steps, n_iter)), flush=True)
        shutdown()
    text = report(collect(args.out), command_line())
    print(text)
    if args.docs:
        write_section(args.docs, text, intro=INTRO)


if __name__ == "__main__":
    main()

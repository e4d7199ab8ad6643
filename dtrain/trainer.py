"""The training loop: build, shard, forward, backward, strategy sync, step, evaluate, log, checkpoint.

It knows nothing about how gradients are communicated (`Strategy`), who runs the step (`Engine`) or what the
model computes inside (it logs what the model reports about itself: `dtrain.metrics.ReportsStatistics`).

World-size invariance: at step t the global batch is examples [t*B, (t+1)*B) of the training stream whatever
the world size, rank r takes the contiguous slice r*B/S ... (r+1)*B/S, and each rank's loss is its summed loss
divided by (B/S x targets per example). The strategies average over ranks, so every rank ends up with the
gradient of the global-batch mean loss, exactly as a single process would.

Gradient accumulation (`train.grad_accum: N`): rank r's slice is split into N contiguous micro-batches of
B/(S N) examples. Each micro-batch's summed loss is divided by the same B/S x targets per example, so the N
backward passes add up to the gradient of the rank's mean loss over its B/S examples; the first N-1 run inside
`strategy.no_sync()`, then one `strategy.synchronize()` and one optimizer step. So (S ranks, accum N) trains
the same model as (S N ranks, accum 1), to fp32 rounding.

The batches come from a DataLoader (`dtrain.data.loader`, `data.workers` processes building them ahead), and
`time/step_s` runs from the moment the step asks for its batch: `time/data_wait_s` is the part spent waiting.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import faults, metrics
from .checkpoint import Checkpointer, CheckpointNotSaved, rng_state, saved_by_this_job, set_rng_state
from .compression import build_strategy, fp32_allreduce_bytes
from .config import Config, ConfigError, check_world_size
from .data import build_task
from .data.loader import TrainLoader, micro_batches
from .distributed import (
    DistEnv,
    Heartbeat,
    PeerUnresponsive,
    all_gather_objects,
    all_ranks_agree,
    all_reduce_sum,
    is_comm_failure,
    run_on_main,
    take_control_bytes,
)
from .engine import build_engine
from .metrics import (
    describe_wire_ratio,
    example_iterations,
    format_bytes,
    ring_allreduce_wire_bytes,
    step_statistics,
    token_iterations,
    wire_ratio,
)
from .model import build_model, regularisation_loss
from .optim import build_optimizer, build_scheduler
from .precision import Precision
from .replicas import ReplicaMismatch, check_replicas
from .rundir import RunDir, check_writable, default_run_dir, write_json_atomic
from .tracking import Tracker


class NonFiniteLoss(RuntimeError):
    pass


def loss_fn(
    logits: torch.Tensor, targets: torch.Tensor, targets_per_example: int, examples: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy over target positions / (examples x targets per example): the per-rank share of
    the global mean, independent of how the batch is split. `examples` defaults to this batch's; a micro-batch
    passes its rank's whole share (B/S), so the micro-batches' losses add up to the rank's mean."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / ((targets.shape[0] if examples is None else examples) * targets_per_example)


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items are split as evenly as possible into `parts`."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class EvalResult:
    loss: float
    acc: float
    perplexity: float | None = None  # exp(loss), for tasks that report it (masked-LM)
    iters_by_difficulty: dict[int, float] = field(default_factory=dict)  # {} for a model without adaptive compute
    acc_by_difficulty: dict[int, float] = field(default_factory=dict)
    # iterations per token (mean over layers) by the token's difficulty (Task.token_difficulty), and their
    # least-squares slope over the real tokens: {} and None for a model without per-token adaptive computation
    # or a task without a per-token difficulty (the slope is NaN when every token has the same difficulty)
    iters_by_token_difficulty: dict[int, float] = field(default_factory=dict)
    token_iters_slope: float | None = None


def _token_table(difficulty: torch.Tensor, iters: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """float64 [D, 2] CPU rows (tokens, summed iterations) of one eval batch's real tokens, row d for token
    difficulty d."""
    d, y = difficulty[real].long(), iters[real].double()
    size = int(d.max()) + 1 if d.numel() else 0
    return torch.stack([torch.bincount(d, minlength=size).double(), torch.bincount(d, y, minlength=size)], dim=1)


def _sum_tables(tables: list[torch.Tensor]) -> torch.Tensor:
    """The sum of [D_i, 2] token tables, each padded with zero rows to the longest."""
    total = torch.zeros(max((len(t) for t in tables), default=0), 2, dtype=torch.float64)
    for t in tables:
        total[: len(t)] += t
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, task, cfg: Config, env: DistEnv) -> EvalResult:
    """Loss and accuracy over the held-out split, each rank its contiguous share, reduced over ranks; for a model
    with adaptive computation also the iterations by example difficulty and by token difficulty (from the
    iterations of this forward; a task without `token_difficulty` has none). Besides the solver's own exit
    checks, one host sync per batch reads everything the evaluation keeps of it; the per-example rows and the
    per-token tables travel in one gather."""
    was_training = model.training
    model.eval()
    start, end = _split(task.n_val, env.world_size, env.rank)
    # sums: loss, correct, targets counted; per example: (difficulty, iterations, correct, targets); per token
    # difficulty: (tokens, summed iterations)
    loss_sum = correct = counted = 0.0
    per_example: list[torch.Tensor] = []
    per_token: list[torch.Tensor] = []
    adaptive = False
    for lo in range(start, end, cfg.eval.batch_size):
        b = task.batch("val", lo, min(cfg.eval.batch_size, end - lo))
        n = len(b.tokens)
        tokens, mask, targets = b.tokens.to(env.device), b.mask.to(env.device), b.targets.to(env.device)
        logits = model(tokens, mask)
        flat_logits, flat_t = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        loss = F.cross_entropy(flat_logits, flat_t, ignore_index=-100, reduction="sum")
        valid = targets != -100
        hits = (logits.argmax(-1) == targets) & valid
        dims = tuple(range(1, hits.dim()))
        ex_hits, ex_valid = (hits.sum(dims), valid.sum(dims)) if dims else (hits, valid)
        iters = example_iterations(model)
        adaptive = iters is not None
        # on the host, from the batch as built
        token_difficulty = task.token_difficulty(b.tokens)
        tok_iters = token_iterations(model) if token_difficulty is not None else None
        # integers and float32 values, exact in float64: the same figures as read one by one
        parts = [loss.double().reshape(1), ex_hits.double(), ex_valid.double()]
        parts += [t.double().reshape(-1) for t in (iters, tok_iters) if t is not None]
        host = torch.cat(parts).cpu()
        loss_sum += float(host[0])
        ex_hits, ex_valid = host[1 : 1 + n], host[1 + n : 1 + 2 * n]
        correct += float(ex_hits.sum())
        counted += float(ex_valid.sum())
        ex_iters = host[1 + 2 * n : 1 + 3 * n].float() if iters is not None else torch.zeros(n)
        per_example.append(torch.stack([b.difficulty.float(), ex_iters, ex_hits.float(), ex_valid.float()], dim=1))
        if tok_iters is not None:
            offset = 1 + (3 if iters is not None else 2) * n
            per_token.append(_token_table(token_difficulty, host[offset:].reshape(b.tokens.shape), b.mask))
    totals = all_reduce_sum(torch.tensor([loss_sum, correct, counted], dtype=torch.float64))
    local = (
        torch.cat(per_example) if per_example else torch.zeros(0, 4),
        _sum_tables(per_token) if per_token else None,
        adaptive,
    )
    gathered = all_gather_objects(local)
    rows = torch.cat([g[0] for g in gathered])
    adaptive = any(g[2] for g in gathered)  # a rank without validation examples has seen no forward
    token_tables = [g[1] for g in gathered if g[1] is not None]
    model.train(was_training)
    by_iters: dict[int, float] = {}
    by_acc: dict[int, float] = {}
    for d in sorted({int(x) for x in rows[:, 0].tolist()}):
        sel = rows[rows[:, 0] == d]
        by_iters[d] = float(sel[:, 1].mean())
        by_acc[d] = float(sel[:, 2].sum() / sel[:, 3].sum().clamp(min=1))
    by_token: dict[int, float] = {}
    slope = None
    if token_tables:
        table = _sum_tables(token_tables)
        counts, sums = table[:, 0].tolist(), table[:, 1].tolist()
        by_token = {d: sums[d] / counts[d] for d in range(len(counts)) if counts[d] > 0}
        slope = metrics.least_squares_slope(range(len(counts)), counts, sums)
    loss = float(totals[0] / max(totals[2], 1))
    return EvalResult(
        loss=loss,
        acc=float(totals[1] / max(totals[2], 1)),
        perplexity=math.exp(min(loss, 700.0)) if task.spec.reports_perplexity else None,
        iters_by_difficulty=by_iters if adaptive else {},
        acc_by_difficulty=by_acc,
        iters_by_token_difficulty=by_token,
        token_iters_slope=slope if by_token else None,
    )


def _nonfinite(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """1.0 if the loss or any gradient holds a NaN or Inf, else 0.0: a float64 scalar on the loss's device,
    computed without a host sync. The gradients are checked together through their max-abs norms (one fused
    `_foreach_norm`): NaN and ±Inf propagate through a max, and a max of finite values never overflows."""
    values = [loss.detach().reshape(1).float()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        values.append(torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))]))
    return (~torch.isfinite(torch.cat(values)).all()).double()


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, config_path: str | None = None, resume: bool = False) -> None:
        self.cfg, self.env = cfg, env
        B, S = cfg.train.batch_size, env.world_size
        check_world_size(cfg, S)
        self.local_batch = B // S
        self.grad_accum = cfg.train.grad_accum
        self.loader: TrainLoader | None = None
        self.path = default_run_dir(cfg, config_path, S)
        ok = True
        if env.is_main:
            try:
                check_writable(self.path)
            except ConfigError as err:
                ok, reason = False, str(err)
        if not all_ranks_agree(ok):
            raise ConfigError(reason if not ok else f"run directory {self.path} is not writable on rank 0")
        self.rundir = RunDir(self.path, env.is_main)
        # A worker that torchrun restarted (after a failure, or a node leaving or joining an elastic job) resumes by
        # itself from the last good checkpoint; rank 0 decides for all, so every rank resumes or none does.
        self.resume = resume or run_on_main(lambda: saved_by_this_job(self.rundir.checkpoints))
        if self.resume:
            faults.disarm()  # an injected fault fires in the job's first start only

        # a resumed run rebuilds its task from the files it kept (the text task's tokenizer); one rank trains it
        self.task = build_task(cfg.data, self.path if self.resume else None, share=run_on_main)
        if env.is_main:
            for name, text in self.task.run_files().items():
                (self.path / name).write_text(text)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and world size
        self.model = build_model(cfg, self.task.spec).to(env.device)
        self.strategy = build_strategy(cfg.comm)
        fwd = self.strategy.attach(self.model)
        self.optimizer = build_optimizer(cfg.train, self.model)
        self.scheduler = build_scheduler(cfg.train, self.optimizer)
        self.precision = Precision(cfg.train.precision, env.device)
        self.engine = build_engine(cfg, self.model, fwd, self.optimizer, self.scheduler, S, self.precision)
        self.ckpt = Checkpointer(self.rundir.checkpoints, env.rank, S, keep=cfg.checkpoint.keep, warn=self.say)
        # dropout masks differ by rank (as in any data-parallel job); weights were drawn above
        torch.manual_seed(cfg.train.seed * 1_000_003 + env.rank + 1)
        self.heartbeat = Heartbeat(env)
        self.allreduce_bytes = fp32_allreduce_bytes(self.model)
        self.allreduce_wire_bytes = ring_allreduce_wire_bytes(self.allreduce_bytes, S)
        self.params = sum(p.numel() for p in self.model.parameters())

    def say(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(f"dtrain: {msg}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------------
    def _restore(self) -> tuple[int, dict[str, float]]:
        path = self.ckpt.latest_valid()
        if path is None:
            self.say("no checkpoint to resume from; starting at step 0")
            return 0, {}
        meta, local = self.ckpt.load(path, self.model, self.optimizer, self.engine)
        self.scheduler.load_state_dict(meta["scheduler"])
        if local:
            self.strategy.load_state_dict(local.get("strategy", {}))
            set_rng_state(local["rng"])
            self.precision.load_state_dict(local.get("precision", {}))  # fp16: the loss scale goes on
        self.say(f"resumed from {path} (step {meta['step']})")
        return int(meta["step"]), meta.get("totals", {})

    def _log_plan(self) -> None:
        plan = self.strategy.describe()
        for warning in plan.get("warnings", []):
            self.say(f"warning: {warning}")
        if self.env.is_main:
            write_json_atomic(self.path / "plan.json", plan)

    def running_totals(self, start: int, restored: dict[str, float]) -> dict[str, float]:
        """The sums the summary is made of, from step `start` on: those a checkpoint restored, zero otherwise."""
        return {
            "bytes": 0.0,
            "wire": 0.0,
            "control": 0.0,
            "comm_s": 0.0,
            "step_s": 0.0,
            "data_s": 0.0,
            "steps_timed": 0.0,
            "skipped": 0.0,
            # fp32 ring all-reduce's wire bytes, summed step by step: a job that re-formed at another world size
            # compares with the reference at the world size of each step (a checkpoint from before this total: at
            # this world size)
            "allreduce_wire": self.allreduce_wire_bytes * start,
            **restored,
        }

    def _save(self, step: int, totals: dict[str, float]) -> None:
        local = {"strategy": self.strategy.state_dict(), "rng": rng_state(), "precision": self.precision.state_dict()}
        meta = {
            "data_position": step * self.cfg.train.batch_size,
            "scheduler": self.scheduler.state_dict(),
            "totals": totals,
        }
        try:
            self.ckpt.save(step, self.model, self.optimizer, local, meta, self.engine)
        except CheckpointNotSaved as err:
            if self.cfg.checkpoint.on_error == "stop":
                raise CheckpointNotSaved(f"{err} (checkpoint.on_error=stop)") from None
            self.say(f"warning: {err}; training goes on (checkpoint.on_error=warn)")

    def _due(self, every: int, step: int) -> bool:
        return every > 0 and step % every == 0 and step < self.cfg.train.steps

    # ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        start, totals = self._restore() if self.resume else (0, {})
        self.rundir.open(cfg, resume=start > 0)
        if start > 0:
            self.rundir.truncate_metrics_after(start)
        totals = self.running_totals(start, totals)
        tracker = Tracker(cfg.log.wandb, self.path, cfg.log.project, self.path.name, cfg.to_dict(), env.is_main)
        if start == 0:
            self.say(
                f"{self.params:,} parameters | strategy {cfg.comm.strategy} | world size {env.world_size} | "
                f"run dir {self.path}"
            )
        wall0 = time.perf_counter()
        bar = tqdm(
            total=cfg.train.steps,
            initial=start,
            disable=not (env.is_main and cfg.log.progress),
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )
        plan_logged = False
        last_eval: EvalResult | None = None
        step = start
        try:
            self.loader = TrainLoader(
                self.task,
                cfg.train.batch_size,
                env.world_size,
                env.rank,
                start,
                cfg.train.steps,
                workers=cfg.data.workers,
                prefetch=cfg.data.prefetch,
                device=env.device,
            )
            for step in range(start, cfg.train.steps):
                self.heartbeat.beat(step + 1)
                row = self._train_step(step, totals)
                if not plan_logged:
                    self._log_plan()
                    plan_logged = True
                done = step + 1
                final = done == cfg.train.steps
                faults.fire("train", done, env.rank, self.model)
                # evaluation and the replica check run before the step's row is written, so their control
                # traffic is charged to this step; the checkpoint is saved after it (the row must be on disk
                # before a checkpoint at this step exists), so its (barrier-only) traffic goes to the next row
                ev = evaluate(self.model, self.task, cfg, env) if final or self._due(cfg.eval.every, done) else None
                if self._due(cfg.train.consistency_every, done):
                    check_replicas(self.model)
                control = take_control_bytes()
                totals["control"] += control
                row[metrics.COMM_CONTROL_BYTES] = control
                if done % cfg.log.every == 0 or final:
                    self.rundir.log(row)
                    tracker.log(row)
                if ev is not None:
                    last_eval = self._eval_row(ev, done, totals, tracker)
                if self._due(cfg.checkpoint.every, done):
                    self._save(done, totals)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row[metrics.TRAIN_LOSS]:.4f}",
                    sent=format_bytes(row[metrics.COMM_BYTES_SENT]) + "/step",
                    refresh=False,
                )
            self.loader.close()
            if last_eval is None:  # resumed at the last step: nothing left to train, evaluate the model as it is
                last_eval = self._eval_row(evaluate(self.model, self.task, cfg, env), cfg.train.steps, totals, tracker)
            self._save(cfg.train.steps, totals)
            totals["control"] += take_control_bytes()
            self._log_plan()  # once more at the end: a plan that changed during the run (a rank budget) shows it
        except BaseException as err:
            if self.loader is not None:
                self.loader.close()
            self.heartbeat.close()
            bar.close()
            tracker.finish()
            self.rundir.close()
            if isinstance(err, Exception) and is_comm_failure(err):
                raise PeerUnresponsive(
                    f"communication failed at step {step + 1} on rank {env.rank} "
                    f"(comm.timeout_s={cfg.comm.timeout_s:g}): {self.heartbeat.diagnose(step + 1)}; "
                    f"cause: {str(err).splitlines()[0][:200]}"
                ) from err
            raise
        self.heartbeat.close()
        bar.close()
        summary = self._summary(totals, last_eval, time.perf_counter() - wall0)
        self.rundir.save_model(self.model.state_dict())
        self.rundir.write_summary(summary)
        tracker.finish(summary)
        self.rundir.close()
        ratio = summary[metrics.COMM_PAYLOAD_RATIO]
        versus = (
            "as many bytes as"
            if round(ratio, 1) == 1.0
            else f"{ratio:.1f}x fewer bytes than"
            if ratio > 1
            else f"{1 / ratio:.1f}x MORE bytes than"
        )
        perplexity = summary.get(metrics.FINAL_VAL_PERPLEXITY)
        quality = f"val acc {summary[metrics.FINAL_VAL_ACC]:.4f}" + (
            f", perplexity {perplexity:.2f}" if perplexity is not None else ""
        )
        self.say(
            f"done: {cfg.train.steps} steps | {quality} | "
            f"{format_bytes(summary[metrics.COMM_BYTES_PER_STEP])}/step sent ({versus} fp32 all-reduce) | "
            f"{format_bytes(summary[metrics.COMM_WIRE_BYTES_PER_STEP])}/step on the wire "
            f"({describe_wire_ratio(summary[metrics.COMM_WIRE_RATIO], env.world_size)}) | "
            f"{summary[metrics.WALL_S]:.1f} s | {self.path}"
        )
        self.strategy.close()
        self.engine.close()
        return summary

    def _train_step(self, step: int, totals: dict[str, float]) -> dict[str, Any]:
        cfg, env, task = self.cfg, self.env, self.task
        assert self.loader is not None
        t0 = time.perf_counter()
        batch = self.loader.next().to(env.device)
        data_s = time.perf_counter() - t0
        micro = micro_batches(batch, self.grad_accum)
        loss_sum: torch.Tensor | None = None
        for j, mb in enumerate(micro):
            # every micro-batch but the last only accumulates; the last one's backward may start the sync
            with self.strategy.no_sync() if j < len(micro) - 1 else contextlib.nullcontext():
                with self.precision.autocast():
                    logits = self.engine.forward(mb.tokens, mb.mask)
                    examples = self.local_batch if len(micro) > 1 else None
                    loss = loss_fn(logits, mb.targets, task.spec.targets_per_example, examples)
                loss = faults.corrupt_loss(loss, step + 1, env.rank)
                # the model's own regulariser (fpsa.jac_reg) joins the gradient but not the logged loss
                extra = regularisation_loss(self.model)
                self.engine.backward(loss if extra is None else loss + extra)  # the engine scales it (fp16)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        assert loss_sum is not None
        stats = self.strategy.synchronize()
        self.precision.unscale_(self.optimizer)  # fp16: the synchronised gradients in their true units
        # One small all-reduce: the global mean loss for the log, and whether any rank saw NaN/Inf, so all
        # ranks take the same decision and no rank ever applies a partial update. It is built on the device
        # without a host sync, and the gradient norm for clipping is computed before it (the synchronised
        # gradient is the same on every rank), so one `tolist()` reads the loss, the flag and the norm: the
        # trainer's only host sync of the step.
        loss_bad = (~torch.isfinite(loss_sum)).double().reshape(())
        flags = all_reduce_sum(torch.stack([loss_sum.double().reshape(()), _nonfinite(loss_sum, self.model), loss_bad]))
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if cfg.train.grad_clip > 0 and params else None
        )
        if total_norm is None:
            loss_total, bad_ranks, loss_bad_ranks = flags.tolist()
            norm = float("nan")
        else:
            loss_total, bad_ranks, loss_bad_ranks, norm = torch.cat([flags, total_norm.reshape(1).to(flags)]).tolist()
        global_loss, bad = loss_total / env.world_size, bad_ranks > 0
        # fp16: gradients that overflowed under a finite loss are the scaler's business (it skips the update and
        # lowers the scale), not a NaN for train.nan_policy
        overflow = bad and loss_bad_ranks == 0 and self.precision.scaler is not None
        grad_norm = float("nan")
        if overflow:
            totals["skipped"] += 1
            self.engine.zero_grad()
            self.scheduler.step()
        elif bad:
            totals["skipped"] += 1
            if cfg.train.nan_policy == "stop":
                raise NonFiniteLoss(
                    f"step {step + 1}: non-finite loss or gradient on {int(bad_ranks)} "
                    "rank(s); stopping (train.nan_policy=stop)"
                )
            self.say(
                f"step {step + 1}: non-finite loss or gradient on {int(bad_ranks)} rank(s); "
                "all ranks skip this update (train.nan_policy=skip)"
            )
            self.engine.zero_grad()
            self.scheduler.step()
        else:
            if total_norm is not None:
                # = clip_grad_norm_ (which is get_total_norm, then this), with the norm read above
                torch.nn.utils.clip_grads_with_norm_(params, cfg.train.grad_clip, total_norm)
                grad_norm = norm
            self.engine.step()
        self.precision.update(self.strategy)  # fp16: the scale adapts, error feedback follows it
        step_s = time.perf_counter() - t0
        totals["bytes"] += stats.bytes_sent
        totals["wire"] += stats.wire_bytes
        totals["allreduce_wire"] += self.allreduce_wire_bytes
        totals["comm_s"] += stats.time_s
        totals["step_s"] += step_s
        totals["data_s"] += data_s
        totals["steps_timed"] += 1
        row: dict[str, Any] = {
            metrics.STEP: step + 1,
            metrics.TRAIN_LOSS: global_loss,
            metrics.COMM_BYTES_SENT: stats.bytes_sent,
            metrics.COMM_BYTES_CUM: int(totals["bytes"]),
            metrics.COMM_BYTES_RECV: stats.bytes_recv,
            metrics.COMM_WIRE_BYTES: stats.wire_bytes,
            metrics.COMM_TIME_S: stats.time_s,
            metrics.TIME_STEP_S: step_s,
            metrics.TIME_DATA_WAIT_S: data_s,
            metrics.LR: self.optimizer.param_groups[0]["lr"],
            metrics.GRAD_NORM: grad_norm,
            metrics.SKIPPED: bad,
        }
        row.update(step_statistics(self.model))
        row.update(stats.extra)
        return row

    def _eval_row(self, res: EvalResult, step: int, totals: dict[str, float], tracker: Tracker) -> EvalResult:
        row: dict[str, Any] = {
            metrics.STEP: step,
            metrics.VAL_LOSS: res.loss,
            metrics.VAL_ACC: res.acc,
            metrics.COMM_BYTES_CUM: int(totals["bytes"]),
        }
        if res.perplexity is not None:
            row[metrics.VAL_PERPLEXITY] = res.perplexity
        if res.iters_by_difficulty:
            row[metrics.VAL_EXAMPLE_ITERS_MEAN] = sum(res.iters_by_difficulty.values()) / len(res.iters_by_difficulty)
        if res.iters_by_token_difficulty:
            row[metrics.VAL_TOKEN_ITERS_SLOPE] = res.token_iters_slope
            row[metrics.TOKEN_ITERS_BY_DIFFICULTY] = {str(k): v for k, v in res.iters_by_token_difficulty.items()}
        self.rundir.log(row)
        tracker.log(row)
        return res

    def _summary(self, totals: dict[str, float], ev: EvalResult | None, wall_s: float) -> dict[str, Any]:
        cfg = self.cfg
        steps = cfg.train.steps
        timed = max(totals["steps_timed"], 1)
        per_step = totals["bytes"] / steps
        wire_per_step = totals["wire"] / steps
        allreduce_wire_per_step = totals["allreduce_wire"] / steps
        payload_ratio = self.allreduce_bytes / per_step if per_step else float("inf")
        summary: dict[str, Any] = {
            metrics.PARAMS: self.params,
            metrics.WORLD_SIZE: self.env.world_size,
            metrics.STRATEGY: cfg.comm.strategy,
            metrics.STEPS: steps,
            metrics.TASK: cfg.data.task,
            metrics.ATTENTION: cfg.model.attention,
            metrics.COMM_RANK: cfg.comm.rank,
            metrics.SEED: cfg.train.seed,
            metrics.ENGINE: cfg.train.engine,
            metrics.GRAD_ACCUM: cfg.train.grad_accum,
            metrics.PRECISION: cfg.train.precision,
            metrics.FINAL_VAL_ACC: ev.acc if ev else float("nan"),
            metrics.FINAL_VAL_LOSS: ev.loss if ev else float("nan"),
            **({metrics.FINAL_VAL_PERPLEXITY: ev.perplexity} if ev and ev.perplexity is not None else {}),
            metrics.COMM_BYTES_TOTAL: int(totals["bytes"]),
            metrics.COMM_BYTES_PER_STEP: per_step,
            metrics.COMM_WIRE_BYTES_PER_STEP: wire_per_step,
            metrics.COMM_ALLREDUCE_BYTES_PER_STEP: self.allreduce_bytes,
            metrics.COMPRESSION_RATIO: payload_ratio,
            metrics.COMM_PAYLOAD_RATIO: payload_ratio,
            metrics.COMM_ALLREDUCE_WIRE_BYTES_PER_STEP: allreduce_wire_per_step,
            metrics.COMM_WIRE_RATIO: wire_ratio(allreduce_wire_per_step, wire_per_step),
            metrics.COMM_CONTROL_BYTES_PER_STEP: totals["control"] / steps,
            metrics.COMM_TIME_PER_STEP_S: totals["comm_s"] / timed,
            metrics.TIME_STEP_S_MEAN: totals["step_s"] / timed,
            metrics.TIME_DATA_WAIT_S_MEAN: totals["data_s"] / timed,
            metrics.TIME_COMPUTE_S_PER_STEP: (totals["step_s"] - totals["comm_s"]) / timed,
            metrics.SKIPPED_STEPS: int(totals["skipped"]),
            metrics.WALL_S: wall_s,
        }
        if ev and ev.iters_by_difficulty:
            summary[metrics.EXAMPLE_ITERS_BY_DIFFICULTY] = {str(k): v for k, v in ev.iters_by_difficulty.items()}
        if ev and ev.acc_by_difficulty:
            summary[metrics.VAL_ACC_BY_DIFFICULTY] = {str(k): v for k, v in ev.acc_by_difficulty.items()}
        if ev and ev.iters_by_token_difficulty:
            summary[metrics.FINAL_TOKEN_ITERS_SLOPE] = ev.token_iters_slope
            summary[metrics.TOKEN_ITERS_BY_DIFFICULTY] = {str(k): v for k, v in ev.iters_by_token_difficulty.items()}
        return summary


def train(cfg: Config, env: DistEnv, config_path: str | None = None, resume: bool = False) -> dict[str, Any]:
    return Trainer(cfg, env, config_path, resume).run()


__all__ = ["Trainer", "train", "evaluate", "loss_fn", "NonFiniteLoss", "ReplicaMismatch"]

"""`train.engine: deepspeed`: DeepSpeed runs forward, backward and the optimizer step; our strategy still owns
the gradient synchronisation.

DeepSpeed has no comm-hook API, so its own backward all-reduce is switched off
(`enable_backward_allreduce = False`, which both `backward()` and `step()` honour in 0.19) and the trainer's
`strategy.synchronize()` between `backward` and `step` is the only gradient sync. DeepSpeed gets OUR torch
optimizer and scheduler (a "client" optimizer): its own optimizers JIT-compile fused C++ ops on CPU (30-46 s
on first use), and ours keeps 1-rank and N-rank runs bit-comparable with the torch engine.

Gradient accumulation (`train.grad_accum: N`): DeepSpeed's own gradient_accumulation_steps stays 1. The trainer
calls `backward` once per micro-batch (the first N-1 inside `strategy.no_sync()`, each loss already scaled by
the trainer), the backward passes add into p.grad (stage 0 and 1 here register no gradient hooks: no
contiguous_gradients, no overlap_comm), then `strategy.synchronize()` once and `step()` once. To DeepSpeed that
is one batch of B/S per rank per step, on its accumulation boundary, so it neither divides the loss by its GAS
nor reduces anything; its counters (global_steps, global_samples) stay true. A test checks that DeepSpeed at
accum 2 trains the same model as the torch engine at accum 2.

ZeRO-1 (`train.zero_stage: 1`): DeepSpeed partitions the optimizer state; each rank steps its slice of the
flat fp32 parameters and all-gathers the result. Its gradient reduction is the same `allreduce_gradients()` that
the flag switches off, and the epilogue of that reduction is also what copies this rank's slice of p.grad into the
flat partition the step reads. `step()` below runs that epilogue on the strategy's synchronised p.grad, with
nothing queued for DeepSpeed to reduce (checked). Its checkpoints are DeepSpeed's own (`save_state`), since
the optimizer state exists only in partitions. ZeRO-2/3 are refused, see `_check_supported`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, check_world_size
from ..distributed import barrier, count_control_bytes


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested mappings merge key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_user_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config: {p} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config: {p} must hold a JSON object, got {type(data).__name__}")
    return data


def build_ds_config(cfg, world_size: int) -> dict[str, Any]:
    """The ds_config generated from our config, merged with train.deepspeed_config, then checked: anything that
    would make DeepSpeed do part of the trainer's or the strategy's job is refused in one line."""
    t = cfg.train
    check_world_size(cfg, world_size)
    micro = t.batch_size // world_size
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 1:
        # contiguous_gradients only stages DeepSpeed's own reduction (a 2 GB bucket by default), which never
        # runs here; compute_grad_norm would all-reduce a norm that only DeepSpeed's clipping (off) would use
        zero.update(contiguous_gradients=False, compute_grad_norm=False)
    generated: dict[str, Any] = {
        # DeepSpeed sees one batch of B/S per rank per step, whatever train.grad_accum: the trainer runs the
        # micro-batches through engine.backward into the same p.grad and then makes one engine.step(), so
        # DeepSpeed never rescales the loss nor decides where a step ends (see the module docstring)
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        # the trainer clips after strategy.synchronize(), on the synchronised gradient
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        # our checkpoint tag is the same on every rank by construction: no all-reduces to compare it
        "checkpoint": {"tag_validation": "Ignore"},
        "steps_per_print": 2**31 - 1,  # progress is the trainer's tqdm bar
        "comms_logger": {"enabled": t.comms_logger, "verbose": False, "prof_all": True},
    }
    ds = _merge(generated, _load_user_json(t.deepspeed_config)) if t.deepspeed_config else generated
    src = f"train.deepspeed_config ({t.deepspeed_config})" if t.deepspeed_config else "ds_config"

    gas = ds.get("gradient_accumulation_steps")
    if gas != 1:
        raise ConfigError(
            f"{src}: gradient_accumulation_steps={gas} is not supported (the trainer accumulates the "
            "micro-batches itself); remove it and set train.grad_accum instead"
        )
    if (
        ds.get("train_micro_batch_size_per_gpu") * gas * world_size != ds.get("train_batch_size")
        or ds.get("train_batch_size") != t.batch_size
    ):
        raise ConfigError(
            f"{src}: inconsistent batch sizes: train_batch_size={ds.get('train_batch_size')}, "
            f"train_micro_batch_size_per_gpu={ds.get('train_micro_batch_size_per_gpu')}, "
            f"gradient_accumulation_steps={gas}, world size {world_size}; need train_batch_size = micro x 1 x "
            f"world size = train.batch_size ({t.batch_size}); drop the batch keys from the JSON to let dtrain set them"
        )
    if ds.get("gradient_clipping", 0.0):
        raise ConfigError(
            f"{src}: gradient_clipping={ds['gradient_clipping']} must be 0: dtrain clips after the "
            "strategy's synchronisation (set train.grad_clip instead)"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{src}: '{key}' is not supported: dtrain passes its own optimizer and schedule "
                "(train.optimizer, train.lr, train.schedule)"
            )
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"{src}: {key} is not supported: the strategies synchronise fp32 gradients on p.grad")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != t.zero_stage:
        raise ConfigError(
            f"{src}: zero_optimization.stage={stage} differs from train.zero_stage={t.zero_stage}; "
            "set the stage with train.zero_stage"
        )
    if zero.get("overlap_comm"):
        raise ConfigError(
            f"{src}: zero_optimization.overlap_comm=true is not supported: it reduces gradients in "
            "DeepSpeed's backward hooks, a second sync next to comm.strategy; remove it"
        )
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("device", "none") != "none":
            raise ConfigError(
                f"{src}: zero_optimization.{key} is not supported: ZeRO-Offload moves gradients "
                "inside DeepSpeed's own reduction, which comm.strategy replaces; remove it"
            )
    return ds


def _check_supported(cfg, module: nn.Module, fwd: nn.Module) -> None:
    if fwd is not module:
        raise ConfigError(
            f"comm.strategy={cfg.comm.strategy!r} wraps the model (DistributedDataParallel), which "
            "cannot run inside train.engine=deepspeed; use allreduce, powersgd, dad, rankdad or auto"
        )
    if cfg.train.zero_stage >= 2:
        # ZeRO-2 reduce-scatters each gradient in a backward hook that enable_backward_allreduce does not cover,
        # then frees p.grad; ZeRO-3 also partitions the weights. The strategy (even allreduce: it would reduce a
        # second time, or find no p.grad), the trainer's clipping and its NaN check all need whole gradients.
        # (The config already refuses ZeRO-2/3 with the other strategies.)
        raise ConfigError(
            f"train.zero_stage={cfg.train.zero_stage} is not supported by dtrain's deepspeed engine: "
            "ZeRO-2/3 reduce and partition the gradients inside DeepSpeed's backward, where "
            "comm.strategy cannot replace the sync; use train.zero_stage=1 (partitioned optimizer "
            "state) or 0"
        )


class DeepSpeedEngine:
    def __init__(
        self,
        cfg,
        module: nn.Module,
        fwd: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        world_size: int,
    ) -> None:
        _check_supported(cfg, module, fwd)
        ds_config = build_ds_config(cfg, world_size)
        if world_size == 1:
            # a plain `dtrain train` (no launcher): DeepSpeed insists on LOCAL_RANK, which only launchers set
            os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed  # deferred: importing it costs ~2 s and only this engine needs it

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
        # ZeRO-1's weight all-gather calls this torch API, which warns once per process on every run
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        # The strategy is the only gradient sync; DeepSpeed checks this flag in backward() and in step().
        self.ds.enable_backward_allreduce = False
        _unlink_shm_workspace()
        self.module = module
        self.zero_stage = cfg.train.zero_stage
        self.comms_logger = bool(ds_config["comms_logger"]["enabled"])
        # ZeRO-0 keeps plain module + torch optimizer: the Checkpointer's DCP stores them. ZeRO-1's optimizer
        # state exists only as per-rank partitions: DeepSpeed's own checkpoint (save_state / load_state).
        self.state_format: str | None = "deepspeed" if self.zero_stage else None
        self.allgather_bytes = self._allgather_bytes()

    def _allgather_bytes(self) -> int:
        """ZeRO-1's parameter all-gather after every optimizer step: each rank hands its (padded) partition of
        every parameter group to `all_gather_into_tensor`; this payload is charged as control bytes."""
        if self.zero_stage != 1:
            return 0
        import deepspeed.comm as ds_dist

        opt, total = self.ds.optimizer, 0
        for group, partitions in zip(opt.real_dp_process_group, opt.parallel_partitioned_bit16_groups):
            if ds_dist.get_world_size(group=group) > 1:
                mine = partitions[ds_dist.get_rank(group=group)]
                total += mine.numel() * mine.element_size()
        return total

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ds(tokens, mask)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        if self.zero_stage == 1:
            self._partition_gradients()
        # optimizer.step(), then zero_grad, then scheduler.step(): the torch engine's order
        self.ds.step()
        count_control_bytes(self.allgather_bytes)  # ZeRO-1 all-gathered the updated partitions in that step

    def _partition_gradients(self) -> None:
        """ZeRO-1: hand the strategy's synchronised (averaged, clipped) p.grad to the partitioned step.

        DeepSpeed 0.19 stage 1 reduces in `allreduce_gradients()` -> `optimizer.reduce_gradients()`, which queues
        every p.grad into its buckets, reduces them (`average_tensor`: reduce to the owning rank, divided by the
        world size) and ends with `independent_gradient_partition_epilogue()`. That epilogue reduces what is still
        queued, then copies this rank's slice of each p.grad into `averaged_gradients`, which
        `optimizer.step()` reads (without it: KeyError 0). With the reduction switched off, nothing is queued
        (stage 1 without overlap_comm queues nothing in backward hooks; checked here, so a DeepSpeed change cannot
        silently add a second sync), and the epilogue only builds the partition from p.grad as it is."""
        opt = self.ds.optimizer
        queued = sum(b.elements + len(b.params) for b in opt.ipg_buckets.values())
        if queued:
            raise RuntimeError(
                f"DeepSpeed queued gradients for its own reduction ({queued} elements/params) "
                "although enable_backward_allreduce is off; comm.strategy must be the only sync"
            )
        opt.independent_gradient_partition_epilogue()

    # ------------------------------------------------------------------------------------------ checkpoints
    _TAG = "state"

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint under `directory/deepspeed/`: `state/mp_rank_00_model_states.pt` (rank 0:
        module weights, engine counters), `state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (every rank: its
        fp32 partition and its optimizer state), `latest` and DeepSpeed's `zero_to_fp32.py` / `zero_to_torch.py`
        (which turn the partitions into one fp32 state dict). Every rank calls it; it ends with a barrier."""
        self.ds.save_checkpoint(str(directory / "deepspeed"), tag=self._TAG, client_state={}, save_latest=True)

    def load_state(self, directory: Path) -> None:
        """Weights and optimizer partitions back into the engine. The scheduler is the trainer's (meta.json)."""
        path, _ = self.ds.load_checkpoint(
            str(directory / "deepspeed"), tag=self._TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {directory / 'deepspeed'}")

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def close(self) -> None:
        if self.comms_logger:
            import deepspeed.comm

            deepspeed.comm.log_summary()  # a barrier, then rank 0 prints DeepSpeed's own collectives
        self.ds.destroy()


def _unlink_shm_workspace() -> None:
    """DeepSpeed's CPU shared-memory all-reduce, set up in `initialize` when every rank is on this machine (the
    deepspeed launcher sets LOCAL_SIZE = WORLD_SIZE), creates a 66 MB /dev/shm segment per rank and never
    unlinks it: every run, crashed or not, would leave them in RAM. Each rank maps all peers' segments by name
    during its `initialize` (and spins until they exist), so after a barrier the names are no longer needed:
    unlinking then frees the memory when the last process exits. The name is built as in
    deepspeed/ops/csrc/cpu/comm/shm.cpp."""
    env = os.environ
    if env.get("LOCAL_SIZE") != env.get("WORLD_SIZE", "1"):
        return
    barrier()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"
        f"{env.get('RANK', '0')}"
    )
    Path("/dev/shm", name).unlink(missing_ok=True)

"""`train.engine: deepspeed`: DeepSpeed runs forward, backward and the optimizer step; our strategy still owns
the gradient synchronisation.

DeepSpeed has no comm-hook API, so its own backward all-reduce is switched off
(`enable_backward_allreduce = False`, which both `backward()` and `step()` honour in 0.19) and the trainer's
`strategy.synchronize()` between `backward` and `step` is the only gradient sync. DeepSpeed gets OUR torch
optimizer and scheduler (a "client" optimizer): its own optimizers JIT-compile fused C++ ops on CPU (30-46 s
on first use), and ours keeps 1-rank and N-rank runs bit-comparable with the torch engine.

ZeRO: stage 0 only, see `_check_supported` for why stages 1-3 are refused.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError


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
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the world size {world_size}")
    micro = t.batch_size // world_size
    generated: dict[str, Any] = {
        # one micro-batch per step: the trainer has no gradient accumulation
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        # the trainer clips after strategy.synchronize(), on the synchronised gradient
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 2**31 - 1,  # progress is the trainer's tqdm bar
        "comms_logger": {"enabled": t.comms_logger, "verbose": False, "prof_all": True},
    }
    ds = _merge(generated, _load_user_json(t.deepspeed_config)) if t.deepspeed_config else generated
    src = f"train.deepspeed_config ({t.deepspeed_config})" if t.deepspeed_config else "ds_config"

    gas = ds.get("gradient_accumulation_steps")
    if gas != 1:
        raise ConfigError(f"{src}: gradient_accumulation_steps={gas} is not supported (the trainer makes one "
                          "optimizer step per micro-batch); remove it or set 1")
    if ds.get("train_micro_batch_size_per_gpu") * gas * world_size != ds.get("train_batch_size") \
            or ds.get("train_batch_size") != t.batch_size:
        raise ConfigError(
            f"{src}: inconsistent batch sizes: train_batch_size={ds.get('train_batch_size')}, "
            f"train_micro_batch_size_per_gpu={ds.get('train_micro_batch_size_per_gpu')}, "
            f"gradient_accumulation_steps={gas}, world size {world_size}; need train_batch_size = micro x 1 x "
            f"world size = train.batch_size ({t.batch_size}); drop the batch keys from the JSON to let dtrain set them")
    if ds.get("gradient_clipping", 0.0):
        raise ConfigError(f"{src}: gradient_clipping={ds['gradient_clipping']} must be 0: dtrain clips after the "
                          "strategy's synchronisation (set train.grad_clip instead)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: '{key}' is not supported: dtrain passes its own optimizer and schedule "
                              "(train.optimizer, train.lr, train.schedule)")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"{src}: {key} is not supported: the strategies synchronise fp32 gradients on p.grad")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != t.zero_stage:
        raise ConfigError(f"{src}: zero_optimization.stage={stage} differs from train.zero_stage={t.zero_stage}; "
                          "set the stage with train.zero_stage")
    return ds


def _check_supported(cfg, module: nn.Module, fwd: nn.Module) -> None:
    if fwd is not module:
        raise ConfigError(f"comm.strategy={cfg.comm.strategy!r} wraps the model (DistributedDataParallel), which "
                          "cannot run inside train.engine=deepspeed; use allreduce, powersgd, dad, rankdad or auto")
    if cfg.train.zero_stage:
        # ZeRO-1/2/3 move the optimizer onto flat fp32 partitions: the trainer's DCP checkpoint (model +
        # optimizer, written at the end of every run) then fails (get_state_dict: KeyError, measured for 1 and
        # 2). Their optimizer wrappers also own the gradient reduction (stages 2/3 in backward hooks that
        # enable_backward_allreduce does not cover), so the strategy could not be the only sync.
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} is not supported by dtrain's deepspeed engine "
                          "yet (ZeRO partitions the optimizer state, which dtrain's checkpoints cannot store); "
                          "use train.zero_stage=0")


class DeepSpeedEngine:
    def __init__(self, cfg, module: nn.Module, fwd: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, world_size: int) -> None:
        _check_supported(cfg, module, fwd)
        ds_config = build_ds_config(cfg, world_size)
        if world_size == 1:
            # a plain `dtrain train` (no launcher): DeepSpeed insists on LOCAL_RANK, which only launchers set
            os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed  # deferred: importing it costs ~2 s and only this engine needs it

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        # The strategy is the only gradient sync; DeepSpeed checks this flag in backward() and in step().
        self.ds.enable_backward_allreduce = False
        _unlink_shm_workspace()
        self.module = module
        self.comms_logger = bool(ds_config["comms_logger"]["enabled"])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ds(tokens, mask)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        # optimizer.step(), then zero_grad, then scheduler.step(): the torch engine's order
        self.ds.step()

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
    import torch.distributed as dist

    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"
            f"{env.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)

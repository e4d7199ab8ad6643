"""Typed, validated run configuration.

A YAML file plus `--set key.path=value` overrides become a `Config`. Validation happens here, before any
process group exists, and every problem is reported as one line naming the key, the bad value and what is
allowed (`ConfigError`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .compression.registry import EXACT_STRATEGIES, STRATEGIES, STRATEGY_NAMES, strategy_options

#: `data.task` values generated from a seed (no files, no downloads)
SYNTHETIC_TASKS = ("parity", "s5", "a5", "listops")
#: every `data.task` value; dtrain.data builds each. digits: scikit-learn's bundled 8x8 images; text: your files
#: or a Hugging Face dataset (docs/data.md)
TASK_NAMES = (*SYNTHETIC_TASKS, "digits", "text")

__all__ = [
    "Config",
    "ConfigError",
    "EXACT_STRATEGIES",
    "STRATEGY_NAMES",
    "STRATEGIES",
    "SYNTHETIC_TASKS",
    "TASK_NAMES",
    "check_world_size",
    "config_from_dict",
    "dump_config",
    "load_config",
]


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def link_bytes_per_s(rate: str) -> float:
    """A link rate in tc's notation ("100mbit", "1.5gbit") as bytes per second."""
    text = str(rate).strip().lower()
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return value * _RATE_UNITS[unit] / 8
            break
    raise ValueError(f"comm.link_rate: {rate!r} is not a rate such as 100mbit, 1gbit or 25gbit")


class ConfigError(ValueError):
    """A bad configuration: the message is one line meant for the user."""


class _Section(BaseModel):
    # no float key means anything at NaN or ±inf (a timeout of inf overflowed the process group's timedelta)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    family: Literal["dtrain", "hf-bert"] = Field(
        "dtrain",
        description="dtrain: the SELF-Transformer encoder; hf-bert: a Hugging Face BertModel of the same sizes "
        "(needs dtrain[hf]), with FPSA swapped into its self-attention when attention=fpsa",
    )
    attention: Literal["vanilla", "fpsa"] = "fpsa"
    # upper bounds on sizes and counts here and below: sanity caps, far above any model this project trains, so
    # a mistyped value fails in one line instead of in an allocation or a loop that never ends
    d_model: int = Field(64, ge=8, le=65_536)
    n_layers: int = Field(2, ge=1, le=1024)
    n_heads: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=1, le=1_048_576, description="feed-forward width; default 4*d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    learned_temperature: bool = Field(
        False, description="FPSA only: a learned per-head temperature. ADDS n_heads parameters per layer."
    )
    positions: Literal["learned", "sinusoidal"] = Field(
        "learned",
        description="position embeddings: learned (a table of data.seq_len rows), or fixed sinusoidal ones "
        "(no parameters, defined at any length: for evaluating at lengths never trained)",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.learned_temperature and self.attention != "fpsa":
            raise ValueError(
                "model.learned_temperature=true needs model.attention=fpsa (vanilla attention has no "
                "temperature parameter)"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.positions != "learned" and self.family != "dtrain":
            raise ValueError("model.positions=sinusoidal is an option of model.family=dtrain (BERT has its own)")
        return self


class FPSAConfig(_Section):
    max_iter: int = Field(8, ge=1, le=1000)
    tol: float = Field(1e-3, gt=0.0, description="a token stops once ||F(Z) - Z|| / ||Z|| < tol (undamped residual)")
    anderson_memory: int = Field(
        5,
        ge=0,
        le=32,
        description="Anderson acceleration of the forward and adjoint solves: steps of history "
        "(0: the plain damped iteration)",
    )
    damping: float = Field(0.5, gt=0.0, le=1.0, description="alpha in Z <- (1-alpha) Z + alpha F(Z)")
    reinject: bool = Field(True, description="input re-injection F(Z) = X + U(Z); False is the ablation F = U")
    backward: Literal["implicit", "phantom", "bptt"] = "implicit"
    adj_max_iter: int = Field(30, ge=1, le=10_000)
    adj_tol: float = Field(1e-6, gt=0.0)
    phantom_steps: int = Field(1, ge=1, le=1000)
    spectral_norm: bool = False
    jac_reg: float = Field(
        0.0,
        ge=0.0,
        description="weight of the Jacobian penalty (Hutchinson estimate of ||dU/dZ||_F^2 per entry "
        "at the fixed point) added to the training loss",
    )


class DataConfig(_Section):
    task: Literal[TASK_NAMES] = "parity"  # type: ignore[valid-type]
    seq_len: int = Field(16, ge=2, le=4096)
    max_depth: int = Field(3, ge=1, le=10, description="listops: deepest nesting (the difficulty)")
    n_val: int = Field(512, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    workers: int = Field(
        1,
        ge=0,
        le=256,
        description="DataLoader worker processes per rank that build the training batches ahead of the step; "
        "0 builds each batch in the training process, on the critical path",
    )
    prefetch: int = Field(2, ge=1, le=1024, description="batches each worker keeps ready (DataLoader prefetch_factor)")
    # ---- digits
    patch: Literal[1, 2, 4] = Field(
        2, description="digits: side of the square patch of pixels one token covers (1: 64 tokens, 2: 16, 4: 4)"
    )
    shift: int = Field(
        0,
        ge=0,
        le=2,
        description="digits: the training split also holds every image moved by up to this many pixels in each "
        "direction, zero-filled ((2 shift + 1)² copies of each); validation images are never moved",
    )
    # ---- text (docs/data.md)
    objective: Literal["mlm", "classification"] = Field(
        "mlm", description="text: masked-LM over fixed-length blocks, or one label per document"
    )
    path: str | None = Field(
        None, description="text: a file, directory or glob of .txt, .jsonl, .csv or .parquet files"
    )
    text_field: str = Field("text", description="text: the field (column) holding the text in .jsonl/.csv/.parquet")
    label_field: str = Field("label", description="text, classification: the field holding the label")
    hf_dataset: str | None = Field(
        None, description="text: a datasets.load_dataset name, or a directory written by save_to_disk"
    )
    hf_config: str | None = Field(None, description="text: the dataset's configuration name (load_dataset's name=)")
    train_split: str = Field("train", description="text, hf_dataset: the split to train on")
    val_split: str | None = Field(
        "validation",
        description="text, hf_dataset: the validation split; when the dataset has none (and for data.path), "
        "a seeded data.val_fraction of the documents is held out",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="text: share of documents held out for validation")
    online: bool = Field(
        False, description="text, hf_dataset: allow downloads from the Hugging Face Hub (offline by default)"
    )
    tokenizer: str | None = Field(
        None,
        description="text: a tokenizer.json or a transformers tokenizer directory; default: train one on the "
        "training split (saved into the run directory)",
    )
    tokenizer_kind: Literal["wordpiece", "bpe"] = Field(
        "wordpiece", description="text: the kind of tokenizer trained when data.tokenizer is unset"
    )
    vocab_size: int = Field(8192, ge=32, le=1_000_000, description="text: vocabulary of the trained tokenizer")
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0, description="text, mlm: share of each block's tokens predicted")
    cache_dir: str | None = Field(
        None, description="text: where tokenised arrays are cached; default $DTRAIN_CACHE or ~/.cache/dtrain"
    )

    @model_validator(mode="after")
    def _text_source(self) -> DataConfig:
        if self.task == "text" and (self.path is None) == (self.hf_dataset is None):
            raise ValueError(
                "data.task=text needs exactly one source: data.path (files) or data.hf_dataset (a Hugging Face "
                f"dataset); got {'both' if self.path else 'neither'}"
            )
        return self


class TrainConfig(_Section):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1, le=16_777_216, description="GLOBAL batch over all ranks")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches per step: each rank's batch_size/world_size examples go through this many "
        "forward/backward passes, then one gradient synchronisation and one optimizer step",
    )
    # lr and weight_decay reach float32 tensors in the optimizer (a value beyond float32's range fails there)
    lr: float = Field(1e-3, gt=0.0, le=1e6)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1e6)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of forward and loss; fp16 adds a gradient scaler (dtrain.precision)"
    )
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = Field(0, ge=0, le=3)
    deepspeed_config: str | None = Field(None, description="a ds_config JSON merged over the generated one")
    comms_logger: bool = False
    nan_policy: Literal["skip", "stop"] = "skip"
    consistency_every: int = Field(0, ge=0, description="replica checksum every N steps; 0 disables")


class CommConfig(_Section):
    """Every option of every strategy, flat; each strategy reads its own typed subset (`options()`)."""

    strategy: Literal[STRATEGY_NAMES] = "allreduce"  # type: ignore[valid-type]
    rank: int = Field(4, ge=1, description="compression rank (powersgd, ddp-powersgd, rankdad)")
    power_iters: int = Field(1, ge=1, le=1000, description="subspace iterations per step (rankdad)")
    rankdad_mode: Literal["oneway", "twoway", "allreduce", "alternating"] = Field(
        "oneway",
        description="rankdad: oneway/twoway all-gather each rank's factors (one round trip; wire bytes grow as "
        "(S-1) x payload); allreduce finds the summed gradient's subspace with two all-reduces (2(S-1)/S x payload); "
        "alternating all-reduces P and Q on alternate steps (one all-reduce, about half the bytes of allreduce)",
    )
    spectrum_every: int = Field(
        10,
        ge=0,
        description="rankdad: log each layer's singular values and effective "
        "rank every this many steps (0: never); an SVD per layer, so not every step",
    )
    error_feedback: bool = True
    warm_start: bool = True
    start_step: int = Field(2, ge=1, description="powersgd: steps of plain all-reduce before compressing")
    min_compression_rate: float = Field(2.0, ge=1.0)
    link_rate: str | None = Field(
        None,
        description="auto: each rank's link rate (tc's notation: 100mbit, 1gbit, 25gbit); with it auto weighs "
        "time, latency x messages + wire bytes / rate, instead of bytes alone",
    )
    budget_bytes: float | None = Field(
        None,
        gt=0,
        description="rankdad: wire bytes per rank per step for the whole synchronisation; per-layer ranks are chosen "
        "to fit it from the measured spectra (energy captured per byte), instead of comm.rank for every layer",
    )
    budget_ms: float | None = Field(
        None, gt=0, description="rankdad, with comm.link_rate: the budget as milliseconds on the link per step"
    )
    replan_every: int = Field(
        50, ge=1, description="rankdad with a budget: re-choose the per-layer ranks every this many steps"
    )
    link_latency_us: float = Field(
        50.0, ge=0.0, description="auto with link_rate: the latency of one message of a ring step, microseconds"
    )

    @field_validator("link_rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            link_bytes_per_s(value)
        return value

    factor_dtype: Literal["fp32", "bf16", "fp16", "int8", "fp8"] = Field(
        "fp32",
        description="wire format of the low-rank factors; int8 and fp8 (e4m3) carry one fp32 scale per column "
        "(gathered forms) or per block of at most 128 values (summed forms: rankdad allreduce/alternating, powersgd)",
    )
    bucket_mb: float = Field(25.0, gt=0.0, le=1e6)
    rest_dtype: Literal["fp32", "bf16", "fp16", "int8", "fp8"] = Field(
        "fp32",
        description="dad/rankdad/auto: dtype of the uncaptured gradients (biases, norms, embeddings); "
        "bf16/fp16/int8/fp8 are lossy with error feedback (8 bits: one fp32 scale per ≤ 128 values), fp32 is the "
        "exact all-reduce",
    )
    overlap: bool = Field(
        True,
        description="dad/rankdad/auto: start each Linear layer's collective during "
        "backward, as soon as its last Δ arrives, instead of after backward",
    )
    timeout_s: float = Field(
        300.0, gt=0.0, le=1e7, description="a collective that takes longer fails the job (at most 1e7 s, 115 days)"
    )

    @model_validator(mode="after")
    def _strategy_rules(self) -> CommConfig:
        self.options()
        return self

    def options(self) -> BaseModel:
        """This section as the chosen strategy's typed, frozen options (`compression.registry`)."""
        return strategy_options(self)


class EvalConfig(_Section):
    every: int = Field(50, ge=0, description="0: only at the end")
    batch_size: int = Field(256, ge=1)


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="0: only at the end")
    keep: int = Field(2, ge=1)
    on_error: Literal["stop", "warn"] = Field(
        "stop",
        description="a checkpoint that cannot be written (a full disk, a quota): stop the job with one line "
        "(nonzero exit), or warn with one line and train on; either way the earlier checkpoints stay intact",
    )


class LogConfig(_Section):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dtrain"
    every: int = Field(1, ge=1)
    progress: bool = True


class RunConfig(_Section):
    dir: str | None = Field(None, description="default: runs/<config name>-<strategy>-w<world size>")
    name: str | None = None


class Config(_Section):
    model: ModelConfig = ModelConfig()
    fpsa: FPSAConfig = FPSAConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    comm: CommConfig = CommConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        t = self.train
        if t.engine == "deepspeed" and t.zero_stage >= 2 and self.comm.strategy != "allreduce":
            # (with allreduce the config is valid, but the DeepSpeed engine refuses ZeRO-2/3 too: see
            # deepspeed_engine._check_supported)
            raise ValueError(
                f"train.zero_stage={t.zero_stage} with comm.strategy={self.comm.strategy!r}: ZeRO-2/3 partition "
                "gradients inside DeepSpeed, so a custom strategy cannot see whole gradients; use "
                "train.zero_stage=1 (partitioned optimizer state, fed the strategy's gradient) or 0"
            )
        if t.engine == "deepspeed" and self.comm.strategy in ("ddp", "ddp-powersgd"):
            raise ValueError(
                f"comm.strategy={self.comm.strategy!r} wraps the model in DistributedDataParallel, "
                "which cannot run inside train.engine=deepspeed; use allreduce, powersgd, dad, rankdad "
                "or auto"
            )
        if t.engine == "deepspeed" and t.precision != "fp32":
            raise ValueError(
                f"train.precision={t.precision!r} with train.engine='deepspeed': mixed precision is wired for the "
                "torch engine only (DeepSpeed keeps its own fp16/bf16 settings); use train.engine=torch"
            )
        if t.engine == "torch" and t.zero_stage:
            raise ValueError(f"train.zero_stage={t.zero_stage} needs train.engine=deepspeed")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- loading


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc if not str(x).startswith("function-after"))


def _allowed_for(loc: tuple) -> str | None:
    """Names of the fields a section accepts (for unknown-key messages)."""
    cls: Any = Config
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = field.annotation
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return ", ".join(cls.model_fields)
    return None


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(e.get("loc", ()))
    key = _fmt_loc(loc)
    value = e.get("input")
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        allowed = _allowed_for(loc)
        # repr: a key is any YAML string, newlines included, and the message stays one line
        return f"unknown config key {key!r}" + (f" (allowed in this section: {allowed})" if allowed else "")
    if kind in ("literal_error", "enum"):
        allowed = e.get("ctx", {}).get("expected", "")
        return f"{key}: {value!r} is not allowed; allowed: {allowed}"
    if kind == "value_error":
        return str(e.get("ctx", {}).get("error", e.get("msg")))
    if kind == "model_type":
        return f"{key or 'config'}: expected a mapping of keys, got {value!r}"
    msg = e.get("msg", "invalid")
    return f"{key}: {value!r} is invalid: {msg[0].lower() + msg[1:]}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def check_world_size(cfg: Config, world_size: int) -> None:
    """The global batch splits evenly over the ranks and each rank's share into train.grad_accum micro-batches
    (each rank takes B/S examples of every step, in micro-batches of B/(S x grad_accum))."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    if accum == 1 and batch % world_size:
        raise ConfigError(f"train.batch_size={batch} is not divisible by the world size {world_size}")
    if batch % (world_size * accum):
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the world size {world_size} x train.grad_accum={accum} "
            f"(= {world_size * accum}): each rank's share must split into equal micro-batches"
        )

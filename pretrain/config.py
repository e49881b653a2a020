"""The run config: typed sections, YAML loading, `key.sub=value` overrides, validation.

Everything here is torch-free so a bad config fails in well under a second,
before any process group, model or data loader exists. Every mistake a user
can make raises `UserError` naming the key and the fix.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import UserError
from pretrain.model.config import ModelConfig

DTYPES = ("float32", "bfloat16")
DECAYS = ("cosine", "linear", "constant")
BAD_SHARD_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    dir: str = "runs/data/stdlib-byte"  # where `mtp prepare --source stdlib --tokenizer byte` writes
    num_workers: int = 0  # loader threads per rank (shard reads, batch building); 0 reads in the training thread
    on_bad_shard: str = "error"  # "skip" logs and moves on instead of stopping the run
    seed: int = 1234  # the sample order is a pure function of this seed
    log_sample_ids: bool = False  # write every step's window ids to <run.dir>/samples/ (audits of lost/repeated data)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    seq_len: int = 256  # tokens the model reads per sample; the loader adds n_future labels
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward on one rank; the rest is accumulation
    eval_interval: int = 100  # steps between held-out evaluations; 0 turns evaluation off
    eval_steps: int = 10  # held-out batches per evaluation
    log_interval: int = 10  # steps between progress lines and MLflow metrics
    seed: int = 0  # weights and any other randomness of the trainer


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr
    decay: str = "cosine"  # then "cosine", "linear" or "constant" down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1

    def lr_factor(self, step: int, max_steps: int) -> float:
        """Multiplier on the peak lr for optimizer step `step` (0-based).

        Warm-up starts at 1/warmup_steps rather than 0 so the first step
        already moves the weights.
        """
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel ranks (megatron-core), innermost in the rank order
    pp: int = 1  # pipeline stages (DeepSpeed PipelineModule)
    dp: int | None = None  # data-parallel ranks; None = world size / (tp * pp)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0..3; only 0-1 combine with pp > 1
    recompute: bool = False  # activation recomputation of transformer layers
    dtype: str = "float32"  # "bfloat16": bf16 weights, fp32 masters and gradients (needs zero_stage >= 1); CPU too
    layers_per_stage: list[int] | None = None  # trunk layers per pipeline stage; None balances, a head counting as a layer


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints
    keep: int = 3  # newest complete checkpoints kept; older ones are deleted once a newer one is sealed
    dir: str | None = None  # None = <run.dir>/checkpoints
    # YAML key `async` (a Python keyword): write checkpoints in the background from host copies while
    # training goes on; None = on when training on GPUs (runtime.cuda), off on CPUs
    async_: bool | None = field(default=None, metadata={"key": "async"})
    timeout_s: int = 1800  # save and resume collectives wait this long for the slowest rank's files


@dataclass
class TrackingConfig:
    uri: str | None = None  # None = env MLFLOW_TRACKING_URI, else SQLite in the run dir
    experiment: str = "mtp"
    enabled: bool = True


@dataclass
class RunSection:
    dir: str = "runs/default"  # metrics, config, checkpoints and the default MLflow store
    name: str | None = None  # MLflow run name; None = the last part of run.dir


@dataclass
class FaultConfig:
    collective_timeout_s: int = 600  # a collective waiting longer fails the step instead of hanging the job
    max_skipped_steps: int = 5  # consecutive steps with a NaN/inf loss or gradient skipped before the run stops


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSection = field(default_factory=RunSection)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.dir, "checkpoints")

    @property
    def run_name(self) -> str:
        return self.run.name or Path(self.run.dir).resolve().name

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based) under the schedule."""
        return self.optimizer.lr * self.schedule.lr_factor(step, self.train.max_steps)


@dataclass(frozen=True)
class Layout:
    """How the world splits into tensor, pipeline and data parallel ranks."""

    tp: int
    pp: int
    dp: int
    grad_accum_steps: int  # micro-batches per optimizer step on each data-parallel rank


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


def load_config(path: str, overrides: list[str]) -> RunConfig:
    """Read a YAML run config, apply `section.key=value` overrides, type-check every value."""
    source = f"{path} or its overrides" if overrides else path
    return from_dict(apply_overrides(_read_yaml(path), overrides, source=path), source=source)


def apply_overrides(raw: dict, overrides: list[str], source: str = "config") -> dict:
    """Set each `section.key=value` in the nested dict `raw` (in place); values follow YAML rules."""
    for override in overrides:
        section, key, value = _parse_override(override)
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise UserError(f"section '{section}' in {source} must be a mapping of keys to values")
        raw[section][key] = value
    return raw


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested plain data, rejecting unknown names and wrong types."""
    sections = {}
    for name, values in raw.items():
        cls = SECTIONS.get(name)
        if cls is None:
            raise UserError(f"unknown section '{name}' in {source}{_suggest(str(name), SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"section '{name}' in {source} must be a mapping of keys to values")
        sections[name] = _build_section(name, cls, values, source)
    return RunConfig(**sections)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        shipped = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f" (shipped configs: {', '.join('configs/' + s for s in shipped)})" if shipped else ""
        raise UserError(f"config file {path} not found; pass the path of a YAML run config{hint}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return raw


def _parse_override(text: str) -> tuple[str, str, Any]:
    """`train.max_steps=20` -> ("train", "max_steps", 20); the value follows YAML scalar rules."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"override '{text}' must look like section.key=value, e.g. train.max_steps=20")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return parts[0], parts[1], parsed


def _build_section(name: str, cls: type, values: dict, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {_key(f): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown key '{name}.{key}' in {source}{_suggest(str(key), known, prefix=name + '.')}")
        kwargs[known[key]] = _coerce(value, hints[known[key]], f"{name}.{key}")
    return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
    """The YAML key of a config field: its name, unless that is a Python keyword (`checkpoint.async`)."""
    return f.metadata.get("key", f.name)


def as_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain data under its YAML keys (what `from_dict` reads back)."""
    out = {}
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        plain = dataclasses.asdict(values)
        out[section.name] = {_key(f): plain[f.name] for f in dataclasses.fields(values)}
    return out


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid names: {', '.join(prefix + c for c in sorted(choices))}"


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _type_name(tp: Any) -> str:
    """How an error message names a declared type: "an integer or null", "a list of numbers"."""
    args = typing.get_args(tp)
    if _is_union(tp):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is list:
        return f"a list of {_plural(args[0])}"
    return _TYPE_NAMES.get(tp, f"a {getattr(typing.get_origin(tp) or tp, '__name__', tp)}")


def _plural(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"lists of {_plural(typing.get_args(tp)[0])}"
    return _PLURALS.get(tp, f"{getattr(typing.get_origin(tp) or tp, '__name__', tp)}s")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type or raise a UserError naming the key."""
    if _is_union(tp):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise _type_error(key, tp, value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        item = typing.get_args(tp)[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp not in _TYPE_NAMES:  # a type a section added later (dict, tuple, ...): accept it as is
        if isinstance(value, typing.get_origin(tp) or tp):
            return value
        raise _type_error(key, tp, value)
    converted = _scalar(value, tp)
    if converted is None:
        raise _type_error(key, tp, value)
    return converted


def _scalar(value: Any, tp: type) -> Any:
    """The value as `tp`, or None when it cannot be one without guessing."""
    if tp is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return None
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        try:  # YAML 1.1 reads exponents without a dot, like 3e-4, as strings
            return float(value)
        except ValueError:
            return None
    if tp is str:
        return str(value)
    return None


def _type_error(key: str, tp: Any, value: Any) -> UserError:
    shown = "null" if value is None else repr(value)
    return UserError(f"{key} must be {_type_name(tp)}, got {shown}")


def validate(cfg: RunConfig, world_size: int) -> Layout:
    """Reject impossible settings before any work starts; return the parallel layout."""
    cfg.model.validate()
    layout = _layout(cfg, world_size)
    for ok, message in _checks(cfg, layout):
        if not ok:
            raise UserError(message)
    from parallel.topology import check_parallel  # torch-free; lives with the layout code it mirrors

    check_parallel(cfg, cfg.parallel.layers_per_stage)
    return layout


def _layout(cfg: RunConfig, world_size: int) -> Layout:
    p, t = cfg.parallel, cfg.train
    if p.tp < 1 or p.pp < 1 or (p.dp is not None and p.dp < 1):
        raise UserError("parallel.tp, parallel.pp and parallel.dp must be >= 1")
    model_parallel = p.tp * p.pp
    if p.dp is None:
        if world_size % model_parallel:
            raise UserError(
                f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes or change parallel.tp/parallel.pp"
            )
        dp = world_size // model_parallel
    else:
        dp = p.dp
        if model_parallel * dp != world_size:
            raise UserError(
                f"parallel.tp * parallel.pp * parallel.dp = {model_parallel * dp} but {world_size} processes "
                "were launched; set parallel.dp=null to derive it from the world size"
            )
    per_step = t.micro_batch_size * dp
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp} = {per_step}"
        )
    return Layout(tp=p.tp, pp=p.pp, dp=dp, grad_accum_steps=t.global_batch_size // per_step)


def _checks(cfg: RunConfig, layout: Layout) -> list[tuple[bool, str]]:
    m, t, o, s, p = cfg.model, cfg.train, cfg.optimizer, cfg.schedule, cfg.parallel
    return [
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.seq_len >= 1, "train.seq_len must be >= 1"),
        (t.seq_len <= m.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len"),
        (t.eval_interval >= 0, "train.eval_interval must be >= 0 (0 turns evaluation off)"),
        (t.eval_steps >= 1, "train.eval_steps must be >= 1"),
        (t.log_interval >= 1, "train.log_interval must be >= 1"),
        (o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         "optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
        (o.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
        (o.eps > 0, "optimizer.eps must be > 0"),
        (o.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0 disables clipping)"),
        (s.decay in DECAYS, f"schedule.decay must be one of {', '.join(DECAYS)}, got '{s.decay}'"),
        (0 <= s.warmup_steps <= t.max_steps,
         f"schedule.warmup_steps={s.warmup_steps} must be between 0 and train.max_steps={t.max_steps}"),
        (0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio must be between 0 and 1"),
        (p.pp <= m.trunk_layers,
         f"parallel.pp={p.pp} exceeds the {m.trunk_layers} trunk layers; every pipeline stage needs a layer"),
        (p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}"),
        (p.zero_stage <= 1 or p.pp == 1,
         f"parallel.zero_stage={p.zero_stage} cannot run with pipeline parallelism (parallel.pp={p.pp}); "
         "use parallel.zero_stage=1 or parallel.pp=1"),
        (m.n_heads % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}"),
        (m.kv_heads % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_kv_heads={m.kv_heads}"),
        (m.ffn_size % p.tp == 0, f"parallel.tp={p.tp} must divide the feed-forward size {m.ffn_size}"),
        (p.dtype in DTYPES, f"parallel.dtype must be one of {', '.join(DTYPES)}, got '{p.dtype}'"),
        # DeepSpeed 0.19.8 keeps fp32 master weights and accumulates gradients in fp32 only inside its
        # ZeRO and bf16 optimizers; at stage 0 a bf16 model would sum and reduce bf16 gradients.
        (p.dtype != "bfloat16" or p.zero_stage >= 1,
         "parallel.dtype=bfloat16 needs parallel.zero_stage=1, 2 or 3 (fp32 master weights and fp32 gradient "
         "accumulation come with DeepSpeed's ZeRO optimizers; stage 1 costs no memory at one data-parallel rank)"),
        (cfg.data.on_bad_shard in BAD_SHARD_POLICIES,
         f"data.on_bad_shard must be one of {', '.join(BAD_SHARD_POLICIES)}, got '{cfg.data.on_bad_shard}'"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.checkpoint.interval >= 1, "checkpoint.interval must be >= 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1; the newest checkpoint is always kept"),
        (cfg.checkpoint.timeout_s >= 1, "checkpoint.timeout_s must be >= 1 (seconds)"),
        (bool(cfg.tracking.experiment), "tracking.experiment must not be empty"),
        (bool(cfg.run.dir), "run.dir must not be empty"),
        (cfg.fault.collective_timeout_s >= 1, "fault.collective_timeout_s must be >= 1 (seconds)"),
        (cfg.fault.max_skipped_steps >= 0, "fault.max_skipped_steps must be >= 0 (0 stops at the first NaN/inf step)"),
    ]


def check_data_dir(cfg: RunConfig) -> None:
    """Fail early, with the command that fixes it, when the prepared data is missing."""
    manifest = Path(cfg.data.dir) / "manifest.json"
    if not manifest.is_file():
        raise UserError(
            f"no prepared data at data.dir={cfg.data.dir} ({manifest} is missing); run "
            f"`mtp prepare --source stdlib --tokenizer byte --out {cfg.data.dir}` or point data.dir at prepared shards"
        )


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Flattened `section.key -> value`, the shape MLflow params want."""
    return {f"{section}.{key}": value for section, values in as_dict(cfg).items() for key, value in values.items()}


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML that `load_config` reads back to an equal RunConfig."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(as_dict(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)

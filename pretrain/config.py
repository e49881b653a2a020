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
class SourceConfig:
    """One prepared data set of a weighted mixture (`data.sources`)."""

    dir: str  # a directory `mtp prepare` wrote (or a URL prefix)
    weight: float = 1.0  # relative share of the stream positions; the weights need not sum to 1
    name: str | None = None  # the source's name in metrics (tokens/NAME, val_loss/NAME); None = last part of dir


@dataclass
class DataConfig:
    dir: str = "runs/data/stdlib-byte"  # where `mtp prepare --source stdlib --tokenizer byte` writes
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture; when given, `dir` is not used
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
    # megatron's sequence parallelism: norms, residuals and saved activations split along the sequence
    # over the tensor-parallel ranks (activation memory / tp at the same communication); needs tp > 1
    sequence_parallel: bool = False
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
    close_timeout_s: int = 60  # the longest the end of a run waits for MLflow to take what is still queued


@dataclass
class RunSection:
    dir: str = "runs/default"  # metrics, config, checkpoints and the default MLflow store
    name: str | None = None  # MLflow run name; None = the last part of run.dir


@dataclass
class FaultConfig:
    collective_timeout_s: int = 600  # a collective waiting longer fails the step instead of hanging the job
    max_skipped_steps: int = 5  # consecutive steps with a NaN/inf loss or gradient skipped before the run stops
    lock_timeout_s: int = 120  # a run-dir lock not renewed for this long (holder on another host) is taken over


EVAL_SUITES = ("loss", "acceptance", "humaneval")


@dataclass
class EvalConfig:
    """`mtp eval` suites run on the just-saved checkpoint during training (docs/evaluation.md)."""

    suites: list[str] = field(default_factory=list)  # any of loss, acceptance, humaneval; empty = none
    interval: int = 0  # steps between evaluations, a multiple of checkpoint.interval; 0 = off
    humaneval_limit: int | None = None  # the first N HumanEval problems only; None = all 164
    max_new_tokens: int | None = None  # per HumanEval completion; None = 384, at most half of model.max_seq_len
    loss_windows: int | None = None  # held-out windows of the loss suite; None = the whole val split
    timeout_s: int = 3600  # an evaluation running longer is stopped and training goes on


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
    eval: EvalConfig = field(default_factory=EvalConfig)

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
    cfg = from_dict(apply_overrides(_read_yaml(path), overrides, source=path), source=source)
    if cfg.model.init_from:  # the shape of a pretrained start comes from its config.json
        from pretrain.hf.shape import apply_llama_shape

        apply_llama_shape(cfg.model)
    return cfg


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
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise UserError(f"config file {path} cannot be read: {err.strerror}") from None
    if raw is None:
        raise UserError(f"config file {path} is empty; start from a shipped config, e.g. configs/tiny-cpu.yaml")
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


def _build_entry(value: Any, cls: type, key: str) -> Any:
    """A mapping inside a section (an entry of `data.sources`) as its dataclass; names its missing keys."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        fields = ", ".join(f"{f.name}: ..." for f in dataclasses.fields(cls))
        raise UserError(f"{key} must be a mapping like {{{fields}}}, got {value!r}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in value]
    if missing:
        raise UserError(f"{key}.{missing[0]} is required")
    return _build_section(key, cls, value, "the config")


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
    if dataclasses.is_dataclass(tp):
        return _build_entry(value, tp, key)
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
    for ok, message in _ranges(cfg):  # first: the model's own checks divide by some of these
        if not ok:
            raise UserError(message)
    cfg.model.validate()
    layout = _layout(cfg, world_size)
    for ok, message in _checks(cfg, layout):
        if not ok:
            raise UserError(message)
    from parallel.topology import check_parallel  # torch-free; lives with the layout code it mirrors

    check_parallel(cfg, cfg.parallel.layers_per_stage)
    if cfg.data.sources:
        from data_pipeline.mixture import check_weights  # torch-free

        check_weights([s.weight for s in cfg.data.sources])
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


def _at_least(value, low, key: str, hint: str = "") -> tuple[bool, str]:
    return value >= low, f"{key} must be >= {low}, got {value}{hint}"


def _finite(value: float, key: str, low: float, strict: bool, high: float = math.inf) -> tuple[bool, str]:
    """A finite number above `low` (or at it, unless `strict`) and at most `high`."""
    above = value > low if strict else value >= low
    bound = f"> {low:g}" if strict else f">= {low:g}"
    bound += f" and <= {high:g}" if high != math.inf else ""
    return math.isfinite(value) and above and value <= high, f"{key} must be a finite number {bound}, got {value}"


SEED_LIMIT = 2**63  # numpy's SeedSequence and torch's manual_seed both take seeds in [0, 2**63)


def _ranges(cfg: RunConfig) -> list[tuple[bool, str]]:
    """Signs, ranges and finiteness of every number, one field at a time (cross-field checks: `_checks`)."""
    m, d, t, o, s, p, f = cfg.model, cfg.data, cfg.train, cfg.optimizer, cfg.schedule, cfg.parallel, cfg.fault
    seed_hint = " and < 2**63"
    checks = [
        _at_least(m.d_model, 1, "model.d_model"), _at_least(m.n_layers, 1, "model.n_layers"),
        _at_least(m.n_heads, 1, "model.n_heads"), _at_least(m.max_seq_len, 1, "model.max_seq_len"),
        _at_least(m.n_future, 1, "model.n_future"), _at_least(m.loss_chunk_tokens, 1, "model.loss_chunk_tokens"),
        _finite(m.aux_factor, "model.aux_factor", 0, False), _finite(m.rope_theta, "model.rope_theta", 0, True),
        _finite(m.norm_eps, "model.norm_eps", 0, True), _finite(m.init_std, "model.init_std", 0, True),
        *(_finite(w, f"model.head_weights[{i}]", 0, False) for i, w in enumerate(m.head_weights or [])),
        *(_at_least(v, 1, key) for v, key in ((m.n_kv_heads, "model.n_kv_heads"), (m.ffn_hidden, "model.ffn_hidden"),
                                             (m.vocab_size, "model.vocab_size")) if v is not None),
        (all(len(e) == 2 and e[0] >= 0 and e[0].is_integer() and math.isfinite(e[1]) and e[1] >= 0
             for e in m.aux_schedule),
         f"model.aux_schedule must hold [start_step, factor] pairs, a whole start_step >= 0 and a finite factor "
         f">= 0, got {m.aux_schedule}"),
        _at_least(d.num_workers, 0, "data.num_workers"),
        (0 <= d.seed < SEED_LIMIT, f"data.seed must be >= 0{seed_hint}, got {d.seed}"),
        (0 <= t.seed < SEED_LIMIT, f"train.seed must be >= 0{seed_hint}, got {t.seed}"),
        _at_least(t.max_steps, 1, "train.max_steps"), _at_least(t.seq_len, 1, "train.seq_len"),
        _at_least(t.global_batch_size, 1, "train.global_batch_size"),
        _at_least(t.micro_batch_size, 1, "train.micro_batch_size"),
        _at_least(t.eval_interval, 0, "train.eval_interval", " (0 turns evaluation off)"),
        _at_least(t.eval_steps, 1, "train.eval_steps"), _at_least(t.log_interval, 1, "train.log_interval"),
        _finite(o.lr, "optimizer.lr", 0, True), _finite(o.weight_decay, "optimizer.weight_decay", 0, False),
        _finite(o.eps, "optimizer.eps", 0, True),
        _finite(o.grad_clip, "optimizer.grad_clip", 0, False),
        (len(o.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in o.betas),
         f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], got {o.betas}"),
        _finite(s.min_lr_ratio, "schedule.min_lr_ratio", 0, False, 1),
        _at_least(s.warmup_steps, 0, "schedule.warmup_steps"),
        _at_least(p.tp, 1, "parallel.tp"), _at_least(p.pp, 1, "parallel.pp"),
        (p.layers_per_stage is None or (len(p.layers_per_stage) == p.pp and min(p.layers_per_stage) >= 0),
         f"parallel.layers_per_stage={p.layers_per_stage} must list parallel.pp={p.pp} non-negative trunk-layer "
         "counts, or be null"),
        *((_at_least(p.dp, 1, "parallel.dp", " (or null: derived from the world size)"),) if p.dp is not None else ()),
        _at_least(cfg.checkpoint.interval, 1, "checkpoint.interval"),
        _at_least(cfg.checkpoint.keep, 1, "checkpoint.keep", "; the newest checkpoint is always kept"),
        _at_least(cfg.checkpoint.timeout_s, 1, "checkpoint.timeout_s", " (seconds)"),
        _at_least(f.collective_timeout_s, 1, "fault.collective_timeout_s", " (seconds)"),
        _at_least(f.max_skipped_steps, 0, "fault.max_skipped_steps", " (0 stops at the first NaN/inf step)"),
        _at_least(f.lock_timeout_s, 1, "fault.lock_timeout_s", " (seconds)"),
        _at_least(cfg.tracking.close_timeout_s, 0, "tracking.close_timeout_s", " (seconds)"),
    ]
    return checks


def _checks(cfg: RunConfig, layout: Layout) -> list[tuple[bool, str]]:
    m, t, s, p = cfg.model, cfg.train, cfg.schedule, cfg.parallel
    return [
        (t.seq_len <= m.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len"),
        (s.decay in DECAYS, f"schedule.decay must be one of {', '.join(DECAYS)}, got '{s.decay}'"),
        (0 <= s.warmup_steps <= t.max_steps,
         f"schedule.warmup_steps={s.warmup_steps} must be between 0 and train.max_steps={t.max_steps}"),
        (p.pp <= m.trunk_layers,
         f"parallel.pp={p.pp} exceeds the {m.trunk_layers} trunk layers; every pipeline stage needs a layer"),
        (p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}"),
        (p.zero_stage <= 1 or p.pp == 1,
         f"parallel.zero_stage={p.zero_stage} cannot run with pipeline parallelism (parallel.pp={p.pp}); "
         "use parallel.zero_stage=1 or parallel.pp=1"),
        (m.n_heads % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}"),
        (m.kv_heads % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_kv_heads={m.kv_heads}"),
        (m.ffn_size % p.tp == 0, f"parallel.tp={p.tp} must divide the feed-forward size {m.ffn_size}"),
        *_sequence_parallel_checks(cfg),
        (p.dtype in DTYPES, f"parallel.dtype must be one of {', '.join(DTYPES)}, got '{p.dtype}'"),
        # DeepSpeed 0.19.8 keeps fp32 master weights and accumulates gradients in fp32 only inside its
        # ZeRO and bf16 optimizers; at stage 0 a bf16 model would sum and reduce bf16 gradients.
        (p.dtype != "bfloat16" or p.zero_stage >= 1,
         "parallel.dtype=bfloat16 needs parallel.zero_stage=1, 2 or 3 (fp32 master weights and fp32 gradient "
         "accumulation come with DeepSpeed's ZeRO optimizers; stage 1 costs no memory at one data-parallel rank)"),
        (cfg.data.on_bad_shard in BAD_SHARD_POLICIES,
         f"data.on_bad_shard must be one of {', '.join(BAD_SHARD_POLICIES)}, got '{cfg.data.on_bad_shard}'"),
        (bool(cfg.tracking.experiment), "tracking.experiment must not be empty"),
        (bool(cfg.run.dir), "run.dir must not be empty"),
        *_eval_checks(cfg),
    ]


def _sequence_parallel_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if not p.sequence_parallel:
        return []
    return [
        (p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1: it splits each sequence over the "
                   "tensor-parallel ranks; set parallel.tp or drop parallel.sequence_parallel"),
        (t.seq_len % p.tp == 0, f"parallel.sequence_parallel=true needs train.seq_len={t.seq_len} to be a multiple "
                                f"of parallel.tp={p.tp}"),
        # linear and sequential heads mix tensor-parallel outputs token by token (ParallelProjection),
        # which assumes every rank holds the whole sequence
        (m.head_type == "transformer", f"parallel.sequence_parallel=true needs model.head_type=transformer, got "
                                       f"'{m.head_type}'; drop parallel.sequence_parallel for {m.head_type} heads"),
    ]


def _eval_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    e = cfg.eval
    unknown = [s for s in e.suites if s not in EVAL_SUITES]
    return [
        (not unknown, f"eval.suites has {', '.join(map(repr, unknown))}; choose from {', '.join(EVAL_SUITES)}"),
        (e.interval >= 0, "eval.interval must be >= 0 (0 turns evaluation during training off)"),
        (e.interval == 0 or e.interval % cfg.checkpoint.interval == 0,
         f"eval.interval={e.interval} must be a multiple of checkpoint.interval={cfg.checkpoint.interval}: "
         "evaluation reads the checkpoint saved at that step"),
        (e.humaneval_limit is None or e.humaneval_limit >= 1, "eval.humaneval_limit must be >= 1 or null (all problems)"),
        (e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1 or null"),
        (e.loss_windows is None or e.loss_windows >= 1, "eval.loss_windows must be >= 1 or null (the whole split)"),
        (e.timeout_s >= 1, "eval.timeout_s must be >= 1 (seconds)"),
    ]


def check_data_dir(cfg: RunConfig) -> None:
    """Fail early, with the command that fixes it, when prepared data is missing or unusable:
    every source prepared, one tokenizer for all, positive weights, a window in each split."""
    from data_pipeline.feed import check_sources  # torch-free

    check_sources(cfg.data, cfg.train.seq_len, cfg.model.n_future)


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

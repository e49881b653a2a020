"""Run config: shipped configs, overrides, type errors, impossible combinations."""

import math
import re
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    RunConfig,
    apply_overrides,
    check_data_dir,
    config_to_dict,
    from_dict,
    load_config,
    save_config,
    validate,
)
from pretrain.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A world size that fits each shipped config's layout (documented in its comments).
SHIPPED = {"tiny-cpu": 1, "125m": 8, "1b": 16, "7b": 64, "13b": 64}


def test_every_shipped_config_is_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_validates(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [])
    layout = validate(cfg, SHIPPED[name])
    assert layout.tp * layout.pp * layout.dp == SHIPPED[name]
    assert layout.grad_accum_steps * cfg.train.micro_batch_size * layout.dp == cfg.train.global_batch_size
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert (cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == (0.1, 1.0)


def test_paper_scale_configs_follow_the_paper():
    for name, (layers, d, heads, ffn) in {"7b": (32, 4096, 32, 11008), "13b": (40, 5120, 40, 13824)}.items():
        cfg = load_config(str(CONFIGS / f"{name}.yaml"), [])
        m = cfg.model
        assert (m.n_layers, m.d_model, m.n_heads, m.ffn_size, m.vocab_size) == (layers, d, heads, ffn, 32000)
        assert (cfg.train.seq_len, m.n_future, cfg.parallel.dtype) == (4096, 4, "bfloat16")
        assert 7.5e6 < cfg.train.seq_len * cfg.train.global_batch_size < 9e6
    assert load_config(str(CONFIGS / "7b.yaml"), []).optimizer.lr == 3e-4


@pytest.mark.parametrize("name, layers, trunk, params", [("7b", 32, 28, 6.74e9), ("13b", 40, 36, 13.0e9)])
@pytest.mark.parametrize("n_future", [4, 1])
def test_paper_scale_configs_build_with_the_papers_layer_and_parameter_counts(name, layers, trunk, params, n_future):
    """Built on the meta device (shapes only): the n=4 model and its n=1 baseline, 32 / 40 layers in all."""
    from pretrain.model.counting import param_counts
    from pretrain.model.mtp import MTPModel

    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [f"model.n_future={n_future}"])
    model = MTPModel(cfg.model, device="meta")
    assert len(model.layers) == (trunk if n_future == 4 else layers - 1)
    assert len(model.layers) + len(model.heads.layers) == layers
    assert param_counts(model)["total"] == pytest.approx(params, rel=0.01)


def test_tiny_config_runs_on_cpu_with_one_or_two_ranks():
    cfg = load_config(str(CONFIGS / "tiny-cpu.yaml"), [])
    assert validate(cfg, 1).grad_accum_steps == 2
    assert validate(cfg, 2).dp == 2
    assert cfg.data.dir == "runs/data/stdlib-byte"


def write(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_overrides_are_parsed_and_coerced(tmp_path):
    path = write(tmp_path, {"train": {"max_steps": 5}, "parallel": {"dp": 2}})
    cfg = load_config(path, [
        "train.max_steps=20", "model.n_future=4", "run.dir=runs/x", "data.dir=/some/dir",
        "model.head_weights=[1,0.5,0.5,0.5]", "parallel.dp=null", "optimizer.lr=3e-4",
        "parallel.recompute=true", "run.name=42",
    ])
    assert cfg.train.max_steps == 20 and cfg.model.n_future == 4
    assert cfg.run.dir == "runs/x" and cfg.data.dir == "/some/dir"
    assert cfg.model.head_weights == [1.0, 0.5, 0.5, 0.5]
    assert all(isinstance(w, float) for w in cfg.model.head_weights)
    assert cfg.parallel.dp is None
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.recompute is True
    assert cfg.run.name == "42"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `3e-4` as a string; a learning rate written that way must still work.
    assert load_config(write(tmp_path, {"optimizer": {"lr": "3e-4"}}), []).optimizer.lr == 3e-4


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=ten", "train.max_steps must be an integer, got 'ten'"),
    ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
    ("train.max_steps=null", "train.max_steps must be an integer, got null"),
    ("parallel.recompute=1", "parallel.recompute must be true or false, got 1"),
    ("parallel.dp=two", "parallel.dp must be an integer or null, got 'two'"),
    ("model.head_weights=[1,x]", "model.head_weights must be a list of numbers or null, got [1, 'x']"),
    ("optimizer.betas=0.9", "optimizer.betas must be a list of numbers, got 0.9"),
    ("model.aux_schedule=[1]", "model.aux_schedule[0] must be a list of numbers, got 1"),
])
def test_wrong_types_name_the_key(tmp_path, override, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, {}), [override])
    assert str(err.value) == message


@pytest.mark.parametrize("data, override, fragment", [
    ({}, "train.max_step=3", "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
    ({}, "trian.max_steps=3", "unknown section 'trian'; did you mean 'train'?"),
    ({"optimizer": {"learning_rate": 1.0}}, None, "unknown key 'optimizer.learning_rate'"),
])
def test_unknown_names_suggest_the_closest(tmp_path, data, override, fragment):
    path = write(tmp_path, data)
    with pytest.raises(UserError) as err:
        load_config(path, [override] if override else [])
    assert fragment.split(";")[0] in str(err.value)
    if ";" in fragment:
        assert str(err.value).endswith(fragment.split(";")[1])


@pytest.mark.parametrize("override", ["train.max_steps", "max_steps=3", "a.b.c=1", ".x=1"])
def test_malformed_overrides_show_the_syntax(tmp_path, override):
    with pytest.raises(UserError, match=r"must look like section.key=value"):
        load_config(write(tmp_path, {}), [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope.yaml not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match=r"is not valid YAML"):
        load_config(str(bad), [])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match=r"must hold a mapping of sections"):
        load_config(str(bad), [])
    bad.write_text("train: 3\n")
    with pytest.raises(UserError, match=r"section 'train' .* must be a mapping"):
        load_config(str(bad), [])


def cfg_with(*overrides: str) -> RunConfig:
    return from_dict(apply_overrides({}, list(overrides)))


@pytest.mark.parametrize("overrides, world, fragment", [
    (["train.global_batch_size=10"], 1, "train.global_batch_size=10 must be a positive multiple of train.micro_batch_size"),
    (["train.global_batch_size=8"], 4, "micro_batch_size * data-parallel size = 4 * 4 = 16"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp = 2"),
    (["parallel.dp=2"], 4, "parallel.tp * parallel.pp * parallel.dp = 2 but 4 processes"),
    (["train.seq_len=1024"], 1, "train.seq_len=1024 exceeds model.max_seq_len=512"),
    (["parallel.pp=5"], 5, "parallel.pp=5 exceeds the 3 trunk layers"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage=2 cannot run with pipeline parallelism"),
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage must be 0, 1, 2 or 3"),
    (["parallel.tp=3", "model.d_model=192", "model.n_heads=6"], 3, "parallel.tp=3 must divide the feed-forward size"),
    (["parallel.tp=8", "train.global_batch_size=4"], 8, "parallel.tp=8 must divide model.n_heads=4"),
    (["model.n_kv_heads=1", "parallel.tp=2"], 2, "parallel.tp=2 must divide model.n_kv_heads=1"),
    (["optimizer.lr=0"], 1, "optimizer.lr must be a finite number > 0"),
    (["schedule.warmup_steps=2000"], 1, "schedule.warmup_steps=2000 must be between 0 and train.max_steps=1000"),
    (["schedule.decay=step"], 1, "schedule.decay must be one of cosine, linear, constant"),
    (["optimizer.betas=[0.9]"], 1, "optimizer.betas must be two numbers in [0, 1)"),
    (["parallel.dtype=float16"], 1, "parallel.dtype must be one of float32, bfloat16"),
    (["data.on_bad_shard=ignore"], 1, "data.on_bad_shard must be one of error, skip"),
    (["checkpoint.keep=0"], 1, "checkpoint.keep must be >= 1"),
    (["model.n_future=0"], 1, "model.n_future must be >= 1"),
])
def test_impossible_combinations(overrides, world, fragment):
    with pytest.raises(UserError) as err:
        validate(cfg_with(*overrides), world)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bfloat16_needs_a_zero_optimizer_and_runs_on_cpu():
    """bf16 is allowed anywhere (CPU tests run the GPU's precision path), with DeepSpeed's fp32 masters."""
    with pytest.raises(UserError, match=r"parallel.dtype=bfloat16 needs parallel.zero_stage=1, 2 or 3"):
        validate(cfg_with("parallel.dtype=bfloat16", "parallel.zero_stage=0"), 1)
    assert validate(cfg_with("parallel.dtype=bfloat16", "parallel.zero_stage=1"), 1).dp == 1


def test_dp_is_derived_from_world_size():
    layout = validate(cfg_with("parallel.tp=2", "train.global_batch_size=32"), 8)
    assert (layout.tp, layout.pp, layout.dp, layout.grad_accum_steps) == (2, 1, 4, 2)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(str(CONFIGS / "13b.yaml"), ["model.head_weights=[1,0.5,0.5,0.5]", "checkpoint.dir=/ckpt"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, str(out))
    assert load_config(str(out), []) == cfg


def test_config_to_dict_is_flat():
    flat = config_to_dict(cfg_with("train.max_steps=7"))
    assert flat["train.max_steps"] == 7
    assert flat["optimizer.betas"] == [0.9, 0.95]
    assert flat["model.n_future"] == 4
    assert all(key.count(".") == 1 for key in flat)
    assert {key.split(".")[0] for key in flat} == {
        "model", "data", "train", "optimizer", "schedule", "parallel", "checkpoint", "tracking", "run", "fault", "eval"}


def test_derived_paths_and_name():
    cfg = cfg_with("run.dir=runs/abc")
    assert cfg.checkpoint_dir == "runs/abc/checkpoints" and cfg.run_name == "abc"
    cfg = cfg_with("run.dir=runs/abc", "checkpoint.dir=/elsewhere", "run.name=mine")
    assert cfg.checkpoint_dir == "/elsewhere" and cfg.run_name == "mine"


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = cfg_with("train.max_steps=110", "schedule.warmup_steps=10", "optimizer.lr=1.0", "schedule.min_lr_ratio=0.1")
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cfg.lr_at(110) == pytest.approx(0.1)
    decaying = [cfg.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decaying, decaying[1:]))


def test_linear_and_constant_decay():
    linear = cfg_with("train.max_steps=100", "schedule.warmup_steps=0", "schedule.decay=linear", "schedule.min_lr_ratio=0")
    assert linear.lr_at(50) == pytest.approx(linear.optimizer.lr * 0.5)
    constant = cfg_with("train.max_steps=100", "schedule.decay=constant")
    assert constant.lr_at(99) == constant.optimizer.lr


def _prepared(out: Path, tokenizer: str = "byte") -> str:
    import sysconfig

    from data_pipeline.prepare import PrepareConfig, prepare

    json_dir = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    prepare(PrepareConfig(out=str(out), sources=[json_dir], tokenizer=tokenizer, val_fraction=0.5, workers=1))
    return str(out)


def test_missing_prepared_data_names_the_command(tmp_path):
    cfg = cfg_with(f"data.dir={tmp_path / 'data'}")
    with pytest.raises(UserError, match=r"mtp prepare --source stdlib --tokenizer byte --out .*data"):
        check_data_dir(cfg)
    _prepared(tmp_path / "data")
    check_data_dir(cfg)
    with pytest.raises(UserError, match=r"data.dir: its train split \(\d+ tokens\) is too small for one window.*"
                                        r"lower train.seq_len"):
        check_data_dir(cfg_with(f"data.dir={tmp_path / 'data'}", "train.seq_len=30000", "model.max_seq_len=30000"))


def test_data_sources_are_typed_and_checked(tmp_path):
    a, b = _prepared(tmp_path / "a"), _prepared(tmp_path / "b")
    cfg = cfg_with(f"data.sources=[{{dir: {a}, weight: 3}}, {{dir: {b}, name: text}}]")
    assert [(s.dir, s.weight, s.name) for s in cfg.data.sources] == [(a, 3.0, None), (b, 1.0, "text")]
    validate(cfg, 1)
    check_data_dir(cfg)
    assert load_config_roundtrip(cfg, tmp_path).data.sources == cfg.data.sources
    for sources, message in [
        (f"[{{dir: {a}, weight: 0}}]", r"data.sources\[0\].weight must be a positive number, got 0.0"),
        (f"[{{dir: {a}}}, {{dir: {b}, weight: -2}}]", r"data.sources\[1\].weight must be a positive number"),
        ("[{weight: 2}]", r"data.sources\[0\].dir is required"),
        (f"[{{dir: {a}, wieght: 2}}]", r"unknown key 'data.sources\[0\].wieght'.*did you mean 'data.sources\[0\].weight'"),
        ("[]", None),
    ]:
        if message is None:
            validate(cfg_with(f"data.sources={sources}"), 1)  # an empty list means data.dir alone
            continue
        with pytest.raises(UserError, match=message):
            validate(cfg_with(f"data.sources={sources}"), 1)


def test_data_sources_must_share_a_tokenizer_and_names(tmp_path):
    a, b = _prepared(tmp_path / "a"), _prepared(tmp_path / "b", tokenizer="bpe:300")
    with pytest.raises(UserError, match=r"data.sources\[1\].dir was prepared with another tokenizer \(bpe \d+ ids.*"
                                        r"than data.sources\[0\] \(byte 258 ids\).*--tokenizer"):
        check_data_dir(cfg_with(f"data.sources=[{{dir: {a}}}, {{dir: {b}}}]"))
    with pytest.raises(UserError, match="two data.sources are named 'x'"):
        check_data_dir(cfg_with(f"data.sources=[{{dir: {a}, name: x}}, {{dir: {a}, name: x}}]"))
    with pytest.raises(UserError, match=r"no prepared data at data.sources\[1\].dir="):
        check_data_dir(cfg_with(f"data.sources=[{{dir: {a}}}, {{dir: {tmp_path / 'none'}}}]"))


def load_config_roundtrip(cfg: RunConfig, tmp_path: Path) -> RunConfig:
    save_config(cfg, str(tmp_path / "saved.yaml"))
    return load_config(str(tmp_path / "saved.yaml"), [])


def test_field_types_added_later_are_checked_by_instance():
    # A section may grow a field of a type the coercer has no rule for (here a dict).
    from pretrain.config import _coerce

    assert _coerce({"a": 1}, dict[str, int], "model.extra") == {"a": 1}
    with pytest.raises(UserError, match=r"^model.extra must be a dict, got 3$"):
        _coerce(3, dict[str, int], "model.extra")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["eval.suites=[loss, bleu]"], "eval.suites has 'bleu'; choose from loss, acceptance, humaneval"),
        (["eval.interval=-1"], "eval.interval must be >= 0"),
        (["eval.suites=[loss]", "eval.interval=30", "checkpoint.interval=20"],
         "eval.interval=30 must be a multiple of checkpoint.interval=20"),
        (["eval.humaneval_limit=0"], "eval.humaneval_limit must be >= 1"),
        (["eval.timeout_s=0"], "eval.timeout_s must be >= 1"),
    ],
)
def test_eval_section_is_validated(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        validate(cfg_with(*overrides), 1)


def test_eval_section_accepts_a_schedule():
    cfg = cfg_with("eval.suites=[loss, acceptance]", "eval.interval=40", "checkpoint.interval=20")
    validate(cfg, 1)
    assert cfg.eval.suites == ["loss", "acceptance"] and cfg.eval.interval == 40

"""Every bad value `mtp train` can be given is refused in one line, exit 2, before torch is imported.

Property-based (hypothesis): for every field of every config section, values of the wrong type, out of
range, non-finite, and combinations of fields that cannot work together; the same for the tokenizer
files and for the arguments of every command. Each goes through the real CLI entry point
(`pretrain.cli.main`); `pretrain.train` is replaced by a module that fails the test, so a value that
slips through validation is caught instead of starting a run.
"""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.cli import build_parser, main
from pretrain.config import SECTIONS

REPO = Path(__file__).resolve().parents[2]
BYTE_VOCAB = 258
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def workspace(tmp_path, monkeypatch, capsys, small_corpus):
    """A copy of real prepared data (byte tokenizer: 258 ids; tests damage it) and a trainer never reached."""
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(small_corpus, data)
    reached = types.ModuleType("pretrain.train")

    def run(args, cfg=None):
        raise AssertionError(f"accepted: {args.overrides}")

    reached.run = run
    monkeypatch.setitem(sys.modules, "pretrain.train", reached)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MTP_FAULT", raising=False)
    return tmp_path, data


def refused(workspace, capsys, raw: dict, *overrides: str, world: int = 1, needle: str = "") -> str:
    """Write `raw` as the YAML config, run `mtp train` on it; the single stderr line it printed."""
    tmp_path, data = workspace
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    import os

    os.environ["WORLD_SIZE"] = str(world)
    places = [f"{key}={value}" for key, value in (("data.dir", data), ("run.dir", tmp_path / "run"))
              if key.split(".")[1] not in raw.get(key.split(".")[0], {})]
    try:
        code = main(["train", "--config", str(config), *places, *overrides])
    finally:
        del os.environ["WORLD_SIZE"]
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtp train: error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def fields():
    """(section, field name, declared type) of every config field."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f.name, hints[f.name]


def _base(tp):
    """The non-None types a declared type allows."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in args if a is not type(None)]
    return [tp]


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


WRONG_TYPE = {
    int: st.one_of(st.text(min_size=1).filter(_not_a_number), st.booleans(), st.lists(st.integers(), max_size=2),
                   st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())),
    float: st.one_of(st.text(min_size=1).filter(_not_a_number), st.booleans(), st.lists(st.floats(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)),
    bool: st.one_of(st.integers(), st.text(min_size=1), st.floats(allow_nan=False)),
    str: st.one_of(st.lists(st.text(max_size=3), min_size=1, max_size=2),
                   st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)),
}


def _wrong_type(tp):
    base = _base(tp)
    if typing.get_origin(base[0]) is list:
        return st.one_of(st.integers(), st.text(min_size=1), st.lists(st.text(min_size=1).filter(_not_a_number),
                                                                      min_size=1, max_size=3))
    return WRONG_TYPE[base[0]]


FIELDS = list(fields())


@PROPERTY
@given(data=st.data())
def test_every_field_refuses_a_value_of_the_wrong_type(workspace, capsys, data):
    section, name, tp = data.draw(st.sampled_from(FIELDS))
    value = data.draw(_wrong_type(tp))
    refused(workspace, capsys, {section: {name: value}}, needle=f"{section}.{name}")


NONPOS = st.integers(max_value=0)
NEGATIVE = st.integers(max_value=-1)
NONFINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def positive_float(strict: bool, high: float = math.inf):
    low = st.floats(max_value=0.0, exclude_max=not strict, allow_nan=False)
    above = st.floats(min_value=high, exclude_min=True, allow_nan=False) if high != math.inf else st.nothing()
    return st.one_of(low, above, NONFINITE)


# Numbers out of their range, for every numeric field (a test below keeps this list complete).
OUT_OF_RANGE = {
    **{key: NONPOS for key in (
        "model.d_model", "model.n_layers", "model.n_heads", "model.max_seq_len", "model.n_future",
        "model.loss_chunk_tokens", "model.n_kv_heads", "model.ffn_hidden", "train.max_steps", "train.seq_len",
        "train.global_batch_size", "train.micro_batch_size", "train.eval_steps", "train.log_interval", "parallel.tp",
        "parallel.pp", "parallel.dp", "checkpoint.interval", "checkpoint.keep", "checkpoint.timeout_s",
        "fault.collective_timeout_s",
        "fault.lock_timeout_s", "eval.humaneval_limit", "eval.max_new_tokens", "eval.loss_windows",
        "eval.timeout_s")},
    **{key: NEGATIVE for key in ("train.eval_interval", "data.num_workers", "schedule.warmup_steps",
                                 "fault.max_skipped_steps", "tracking.close_timeout_s", "eval.interval")},
    "eval.suites": st.lists(st.sampled_from(["bleu", "mmlu", "pass@1"]), min_size=1, max_size=2),
    "data.sources": st.lists(st.fixed_dictionaries({"dir": st.just("elsewhere"),
                                                    "weight": positive_float(strict=True)}), min_size=1, max_size=2),
    "model.vocab_size": st.integers(max_value=BYTE_VOCAB - 1),  # also: below the tokenizer's vocabulary
    "data.seed": st.one_of(NEGATIVE, st.integers(min_value=2**63)),
    "train.seed": st.one_of(NEGATIVE, st.integers(min_value=2**63)),
    "parallel.zero_stage": st.one_of(NEGATIVE, st.integers(min_value=4)),
    **{key: positive_float(strict=True) for key in (
        "optimizer.lr", "optimizer.eps", "model.rope_theta", "model.norm_eps", "model.init_std")},
    **{key: positive_float(strict=False) for key in ("optimizer.weight_decay", "optimizer.grad_clip",
                                                     "model.aux_factor")},
    "schedule.min_lr_ratio": positive_float(strict=False, high=1.0),
    "optimizer.betas": st.lists(st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1),
                                          NONFINITE), min_size=2, max_size=2),
    "model.head_weights": st.lists(st.one_of(st.floats(max_value=0, exclude_max=True), NONFINITE), min_size=4,
                                   max_size=4),
    "model.aux_schedule": st.lists(st.tuples(st.one_of(st.floats(max_value=0, exclude_max=True), st.just(0.5)),
                                             st.one_of(NONFINITE, st.floats(max_value=0, exclude_max=True)))
                                   .map(list), min_size=1, max_size=2),
    "parallel.layers_per_stage": st.lists(st.integers(max_value=-1), min_size=1, max_size=1),
}


def test_the_range_table_covers_every_numeric_field():
    numeric = {f"{s}.{n}" for s, n, tp in FIELDS if _base(tp)[0] in (int, float) or typing.get_origin(_base(tp)[0])
               is list}
    assert numeric == set(OUT_OF_RANGE), numeric ^ set(OUT_OF_RANGE)


@PROPERTY
@given(data=st.data())
def test_every_number_out_of_range_or_not_finite_is_refused(workspace, capsys, data):
    key = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    section, name = key.split(".")
    refused(workspace, capsys, {section: {name: data.draw(OUT_OF_RANGE[key])}}, needle=key)


@st.composite
def impossible_combinations(draw):
    """(config, world size, the key the refusal must name): each field fine alone, not together."""
    kind = draw(st.sampled_from(["seq_len", "warmup", "batch", "heads", "head_weights", "tp", "vocab", "kv"]))
    if kind == "seq_len":
        longest = draw(st.integers(1, 512))
        return {"model": {"max_seq_len": longest}, "train": {"seq_len": longest + draw(st.integers(1, 99))}}, 1, \
            "train.seq_len"
    if kind == "warmup":
        steps = draw(st.integers(1, 1000))
        return {"train": {"max_steps": steps}, "schedule": {"warmup_steps": steps + draw(st.integers(1, 99))}}, 1, \
            "schedule.warmup_steps"
    if kind == "batch":
        micro, world = draw(st.tuples(st.integers(1, 8), st.integers(1, 4)).filter(lambda mw: mw[0] * mw[1] > 1))
        glob = micro * world * draw(st.integers(0, 4)) + draw(st.integers(1, micro * world - 1))
        return {"train": {"micro_batch_size": micro, "global_batch_size": glob}}, world, "train.global_batch_size"
    if kind == "heads":
        heads = draw(st.integers(2, 16))
        return {"model": {"n_heads": heads, "d_model": heads * draw(st.integers(1, 8)) + 1}}, 1, "model.d_model"
    if kind == "head_weights":
        n = draw(st.integers(1, 6))
        size = draw(st.integers(1, 8).filter(lambda k: k != n))
        return {"model": {"n_future": n, "head_weights": [1.0] * size}}, 1, "model.head_weights"
    if kind == "tp":
        tp = draw(st.sampled_from([3, 5, 8]))
        return {"parallel": {"tp": tp}, "train": {"global_batch_size": 4, "micro_batch_size": 4}}, tp, "parallel.tp"
    if kind == "kv":
        return {"model": {"n_kv_heads": 3}}, 1, "model.n_kv_heads"
    return {"model": {"vocab_size": draw(st.integers(2, BYTE_VOCAB - 1))}}, 1, "model.vocab_size"


@PROPERTY
@given(case=impossible_combinations())
def test_impossible_combinations_are_refused(workspace, capsys, case):
    raw, world, key = case
    refused(workspace, capsys, raw, world=world, needle=key)


@pytest.mark.parametrize("override, needle", [
    ("model.n_heads=0", "model.n_heads must be >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size must be >= 1"),
    ("train.global_batch_size=-8", "train.global_batch_size must be >= 1"),
    ("model.d_model=-64", "model.d_model must be >= 1"),
    ("model.init_std=-1", "model.init_std must be a finite number > 0"),
    ("optimizer.lr=.inf", "optimizer.lr must be a finite number > 0, got inf"),
    ("model.vocab_size=100", "model.vocab_size=100 is below the 258 tokens of the tokenizer"),
    ("tracking.uri=ftp://host/x", "tracking.uri=ftp://host/x has an unknown scheme 'ftp'"),
])
def test_the_values_the_issue_found(workspace, capsys, override, needle):
    refused(workspace, capsys, {"train": {"max_steps": 200}}, override, needle=needle)


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.head_type=linear"], 2,
     "parallel.sequence_parallel=true needs model.head_type=transformer, got 'linear'"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "train.seq_len=33"], 2,
     "needs train.seq_len=33 to be a multiple of parallel.tp=2"),
])
def test_sequence_parallelism_it_cannot_serve(workspace, capsys, overrides, world, needle):
    refused(workspace, capsys, {"train": {"max_steps": 200}}, *overrides, world=world, needle=needle)


def test_run_dir_naming_a_file_or_below_one(workspace, capsys):
    tmp_path, _ = workspace
    (tmp_path / "afile").write_text("x")
    refused(workspace, capsys, {}, f"run.dir={tmp_path / 'afile'}", needle="names a file, not a directory")
    refused(workspace, capsys, {}, f"run.dir={tmp_path / 'afile' / 'sub'}", needle="is below")


def test_config_files_that_are_empty_or_not_utf8(workspace, capsys):
    tmp_path, data = workspace
    for content, needle in ((b"", "is empty"), (b"train:\n  max_steps: 5 \xff\xfe\n", "is not UTF-8")):
        path = tmp_path / "bad.yaml"
        path.write_bytes(content)
        capsys.readouterr()
        assert main(["train", "--config", str(path), f"data.dir={data}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


@PROPERTY
@given(info=st.one_of(st.binary(min_size=1), st.text(min_size=1).map(str.encode),
                      st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)),
                                      max_size=3).map(lambda d: json.dumps(d).encode())),
       hf=st.one_of(st.none(), st.binary(), st.just(b'{"model": {"type": "BPE"}}')))
def test_tokenizer_files_that_do_not_parse_are_one_line(workspace, capsys, info, hf):
    _, data = workspace
    (data / "tokenizer_info.json").write_bytes(info)
    if hf is None:
        (data / "tokenizer.json").unlink(missing_ok=True)
    else:
        (data / "tokenizer.json").write_bytes(hf)
    if info.strip() == b'{"type": "byte"}' or b'"byte"' in info:
        return  # a valid byte tokenizer
    refused(workspace, capsys, {}, needle="")


def commands(parser=None, prefix=()):
    """(argv prefix, option string, type) of every int/float option of every (sub)command."""
    parser = parser or build_parser()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))
        elif action.option_strings and action.type in (int, float):
            yield prefix, action.option_strings[-1], action.type


NUMERIC_OPTIONS = list(commands())


def test_every_command_has_numeric_options_to_check():
    assert len({p for p, _, _ in NUMERIC_OPTIONS}) >= 8, NUMERIC_OPTIONS


@PROPERTY
@given(data=st.data())
def test_every_numeric_option_of_every_command_refuses_text(capsys, data):
    prefix, option, _ = data.draw(st.sampled_from(NUMERIC_OPTIONS))
    value = data.draw(st.text(min_size=1).filter(_not_a_number).filter(lambda t: not t.startswith("-")))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*prefix, f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and option in err[0], err


def test_generate_prompt_file_that_is_not_utf8(tmp_path):
    from pretrain.errors import UserError
    from pretrain.inference.generate_command import _prompt_file

    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"def f():\n    \xff\xfe\n")
    with pytest.raises(UserError, match=r"--prompt-file .* is not UTF-8 text"):
        _prompt_file(str(bad))


def test_export_out_below_a_regular_file_is_refused_before_reading_anything(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "afile" / "m.st")]) == 2
    assert "which is a file, not a directory" in capsys.readouterr().err


def test_a_config_error_imports_neither_torch_nor_mlflow(tmp_path):
    """The installed entry point, in a fresh interpreter: a bad value costs no heavy import."""
    probe = ("import sys\nfrom pretrain.cli import main\n"
             "code = main(['train', '--config', 'configs/tiny-cpu.yaml', 'model.n_heads=0'])\n"
             "heavy = [m for m in ('torch', 'mlflow', 'matplotlib', 'deepspeed') if m in sys.modules]\n"
             "print(code, heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr

"""Tensor x pipeline x data parallel layouts against the single-process run, through the real `mtp train`.

Six torchrun launches (tests/distributed/layout_worker.py), each running
every variant of one layout in one set of processes: gloo, CPU, float32, a
tiny n=4 model on real stdlib code, three optimizer steps with gradient
clipping active (norms ~13, clip 1.0). Every layout starts from the same
weights as the one-process run (pipeline stages replay MTPModel's
initialisation; tensor parallelism splits the same master weights), so
per-step losses of every head, gradient norms and the final weights must
agree with it to float32 rounding.

Variants: n4 (n_future=4), n1 (n_future=1), rc (n_future=4 with activation
recomputation), with ZeRO stages 0-2 spread over the layouts (ZeRO-3 has
its own launches: tests/distributed/test_zero3.py). `vocab_size`
is 512 in those so the padded vocabulary (a multiple of 128 x tp) is the same
at tp=1 and tp=2 and the random draws line up.

Checkpoint conversion: `v258` runs (the tokenizer's 258 ids, padded to 384
at tp=1 and 512 at tp=2) save step 2 under one layout; another layout copies
that checkpoint, resumes (resharding weights, fp32 masters and Adam moments)
and takes step 3, which must equal the source layout's own step 3.

Run: .venv/bin/python -m pytest -q tests/distributed/test_layouts.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.max_steps=3", "train.eval_interval=0", "train.eval_steps=1", "checkpoint.interval=3",
    "schedule.warmup_steps=1", "tracking.enabled=false",
]
SAME_VOCAB = ["model.vocab_size=512"]
LOSS_RTOL = 1e-5  # per-step losses, every head, and gradient norms
PARAM_RTOL = 2e-5  # ||w - w_ref|| / ||w_ref|| of every parameter after three steps


def variant(name: str, *overrides: str, resume_from: str | None = None) -> dict:
    return {"name": name, "overrides": [*TINY, *overrides], "resume_from": resume_from}


def source(zero: int) -> dict:
    """A run to convert from: the tokenizer's vocabulary, checkpoints at steps 2 and 3."""
    return variant("v258", f"parallel.zero_stage={zero}", "checkpoint.interval=2")


def target(name: str, src: str, zero: int, base: Path) -> dict:
    return variant(name, f"parallel.zero_stage={zero}",
                   resume_from=str(base / src / "v258" / "checkpoints" / "step_000002"))


def plans(base: Path) -> list[tuple[str, int, int, int, list[dict]]]:
    """(name, tp, pp, processes, variants) in launch order: conversion sources run before their targets."""
    def std(z_n4: int, z_n1: int, z_rc: int) -> list[dict]:
        return [variant("n4", *SAME_VOCAB, f"parallel.zero_stage={z_n4}"),
                variant("n1", *SAME_VOCAB, "model.n_future=1", f"parallel.zero_stage={z_n1}"),
                variant("rc", *SAME_VOCAB, "parallel.recompute=true", f"parallel.zero_stage={z_rc}")]

    return [
        ("tp2", 2, 1, 2, [*std(0, 1, 0), source(0)]),
        ("dp2", 1, 1, 2, [*std(2, 1, 2), source(1)]),
        ("pp2", 1, 2, 2, std(0, 1, 1)),
        ("tp2pp2", 2, 2, 4, [*std(1, 0, 0), source(0), target("from_dp2", "dp2", 0, base),
                             target("same", "tp2pp2", 0, base)]),
        ("pp2dp2", 1, 2, 4, [*std(1, 0, 1), target("from_tp2", "tp2", 1, base)]),
        ("single", 1, 1, 1, [*std(0, 0, 0), target("from_tp2pp2", "tp2pp2", 0, base)]),
    ]


LAYOUTS = ["tp2", "dp2", "pp2", "tp2pp2", "pp2dp2"]
CONVERSIONS = [("from_dp2", "tp2pp2", "dp2"), ("from_tp2", "pp2dp2", "tp2"), ("from_tp2pp2", "single", "tp2pp2")]


def launch(base: Path, data: Path, name: str, tp: int, pp: int, world: int, variants: list[dict],
           extra: dict | None = None) -> str:
    """Run one layout_worker launch; `extra` adds keys to its plan (e.g. "zero_optimization")."""
    plan = base / f"{name}.json"
    plan.write_text(json.dumps({"tp": tp, "pp": pp, "out": str(base / name), "data": str(data), "variants": variants,
                                **(extra or {})}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", str(world),
         "tests/distributed/layout_worker.py", str(plan)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    (base / f"{name}.log").write_text(log)
    assert proc.returncode == 0, f"layout {name} failed:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("layouts")
    logs = {plan[0]: launch(base, tiny_corpus, *plan) for plan in plans(base)}
    return base, logs


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from parallel.reshard import SavedCheckpoint

    saved = SavedCheckpoint(str(run_dir / "checkpoints" / "step_000003"))
    return {name: saved.full(name)["param"] for name in saved.names()}


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: list[int]) -> None:
    for step in steps:
        keys = [k for k in want[step] if k.startswith("loss") or k == "grad_norm"]
        assert len(keys) >= 3, keys
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=LOSS_RTOL), f"step {step} {key}"


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, ref in want.items():
        error = float((got[name] - ref).norm() / ref.norm())
        assert error <= PARAM_RTOL, f"{name}: relative difference {error:.2e}"


@pytest.mark.parametrize("name", ["n4", "n1", "rc"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(runs, layout, name):
    base, _ = runs
    assert_same_steps(metrics(base / layout / name), metrics(base / "single" / name), [1, 2, 3])
    assert_same_weights(final_weights(base / layout / name), final_weights(base / "single" / name))


def test_variants_differ_so_the_comparison_can_fail(runs):
    """Guard against comparing a run with itself: the variants train different models."""
    base, _ = runs
    single = {name: metrics(base / "single" / name)[3]["loss_head1"] for name in ("n4", "n1")}
    assert abs(single["n4"] - single["n1"]) > 1e-3
    assert metrics(base / "single" / "n4")[1]["grad_norm"] > 1.0, "clipping (grad_clip 1.0) must be active"


@pytest.mark.parametrize("resumed, layout, saved_by", CONVERSIONS)
def test_resume_under_another_layout(runs, resumed, layout, saved_by):
    base, logs = runs
    assert f"resharding {base / layout / resumed / 'checkpoints' / 'step_000002'}" in logs[layout]
    got, want = metrics(base / layout / resumed), metrics(base / saved_by / "v258")
    assert sorted(got) == [3], "the resumed run must start at step 3"
    assert_same_steps(got, want, [3])
    assert_same_weights(final_weights(base / layout / resumed), final_weights(base / saved_by / "v258"))


def test_resume_under_the_same_pipeline_layout(runs):
    """Same tp=2 x pp=2 layout: DeepSpeed's own pipeline loader, no resharding, and the same step 3."""
    base, logs = runs
    step2 = base / "tp2pp2" / "same" / "checkpoints" / "step_000002"
    assert f"resumed from {step2}" in logs["tp2pp2"] and f"resharding {step2}" not in logs["tp2pp2"]
    got, want = metrics(base / "tp2pp2" / "same"), metrics(base / "tp2pp2" / "v258")
    assert sorted(got) == [3]
    assert_same_steps(got, want, [3])
    assert_same_weights(final_weights(base / "tp2pp2" / "same"), final_weights(base / "tp2pp2" / "v258"))


@pytest.mark.parametrize("layout", [*LAYOUTS, "single"])
def test_megatron_and_deepspeed_groups_agree(runs, layout):
    base, _ = runs
    tp, pp, world = {name: (t, p, w) for name, t, p, w, _ in plans(base)}[layout]
    assert len(list((base / layout / "groups").glob("rank_*.json"))) == world
    dp = world // (tp * pp)
    for rank in range(world):
        groups = json.loads((base / layout / "groups" / f"rank_{rank}.json").read_text())
        assert groups["megatron"] == groups["deepspeed"], f"rank {rank}: {groups}"
        mine = groups["megatron"]
        assert (mine["tp"], mine["dp"], mine["pp"]) == (rank % tp, (rank // tp) % dp, rank // (tp * dp))
        assert rank in mine["tp_group"] and rank in mine["dp_group"] and rank in mine["pp_group"]
        assert (len(mine["tp_group"]), len(mine["dp_group"]), len(mine["pp_group"])) == (tp, dp, pp)


def test_export_reads_a_tensor_and_pipeline_parallel_checkpoint(runs):
    """`full_model_state` (for `mtp export`) loads strictly into a one-process MTPModel with the reference weights."""
    from parallel.megatron_setup import init_model_parallel
    from parallel.reshard import VOCAB_PARAMS, full_model_state
    from pretrain.model.config import ModelConfig
    from pretrain.model.mtp import MTPModel

    base, _ = runs
    step_dir = base / "tp2pp2" / "n4" / "checkpoints" / "step_000003"
    cfg = ModelConfig(**json.loads((step_dir / "extra.json").read_text())["model"])
    state = full_model_state(str(step_dir), cfg.padded_vocab(1))
    init_model_parallel()
    model = MTPModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing)
    reference = final_weights(base / "single" / "n4")
    assert_same_weights({k: state[k][: cfg.vocab_size] if k in VOCAB_PARAMS else state[k] for k in reference},
                        reference)

"""Tensor x pipeline x data parallel layouts against the single-process run, through the real `mtp train`.

Six torchrun launches (tests/distributed/layout_worker.py), each running
every variant of one layout in one set of processes: gloo, CPU, a tiny n=4
model on real stdlib code with the byte tokenizer's own 258 ids (padded to
384 rows at tp=1, 512 at tp=2), three optimizer steps with gradient
clipping active (norms ~13, clip 1.0). Initial weights depend on the seed
and each parameter's name only (pretrain/model/init.py), so every layout
starts from the one-process run's weights whatever its padding, split or
stages, and per-step losses of every head, gradient norms and the final
weights must agree with it to float32 rounding.

Variants: n4 (n_future=4), n1 (n_future=1), rc (n_future=4 with activation
recomputation), with ZeRO stages 0-2 spread over the layouts (ZeRO-3 has
its own launches: tests/distributed/test_zero3.py), and bf16 (the GPU
precision path on the CPU: bf16 weights and activations, DeepSpeed's fp32
master weights, fp32 gradient accumulation and reduction, ZeRO-1), held
to the single-process bf16 run within BF16_RTOL.

Sequence parallelism (megatron's, with its all-gathers and reduce-scatters
under gloo): `sp` at tp=2 (ZeRO-2) and tp=2 x pp=2 (recomputation, ZeRO-1)
against the one-process n4 / rc runs to float32 rounding, `sp_bf16` at tp=2
against the one-process bf16 run.

Checkpoint conversion: `src` runs save step 2 under one layout; another
layout copies that checkpoint, resumes (resharding weights, fp32 masters
and Adam moments) and takes step 3, which must equal the source layout's
own step 3. `same` and `bf16same` resume under the layout that wrote the
checkpoint (DeepSpeed's own loader): float32 to rounding, bf16 exactly.

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
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.max_steps=3", "train.eval_interval=0", "train.eval_steps=1", "checkpoint.interval=3",
    "schedule.warmup_steps=1", "tracking.enabled=false",
]
LOSS_RTOL = 1e-5  # per-step losses, every head, and gradient norms
PARAM_RTOL = 2e-5  # ||w - w_ref|| / ||w_ref|| of every parameter after three steps
BF16 = ["parallel.dtype=bfloat16", "parallel.zero_stage=1"]
# bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-9. Layouts differ in
# which bf16 partial sums they round (tensor-parallel all-reduces of row-parallel outputs, pipeline
# boundaries), and each layer's outputs are rounded again, so losses differ by a few such roundings;
# 2^-6 (1.6%) allows four per step accumulated over the three steps' updates, and is still two
# orders of magnitude below the loss change one step makes here (~0.7 nats of 5.5).
BF16_RTOL = 2.0**-6
SP = "parallel.sequence_parallel=true"


def variant(name: str, *overrides: str, resume_from: str | None = None) -> dict:
    return {"name": name, "overrides": [*TINY, *overrides], "resume_from": resume_from}


def source(zero: int, name: str = "src", *overrides: str) -> dict:
    """A run to convert from: checkpoints at steps 2 and 3."""
    return variant(name, f"parallel.zero_stage={zero}", "checkpoint.interval=2", *overrides)


def target(name: str, src: str, zero: int, base: Path, *overrides: str, run: str = "src") -> dict:
    return variant(name, f"parallel.zero_stage={zero}", *overrides,
                   resume_from=str(base / src / run / "checkpoints" / "step_000002"))


def plans(base: Path) -> list[tuple[str, int, int, int, list[dict]]]:
    """(name, tp, pp, processes, variants) in launch order: conversion sources run before their targets."""
    def std(z_n4: int, z_n1: int, z_rc: int) -> list[dict]:
        return [variant("n4", f"parallel.zero_stage={z_n4}"),
                variant("n1", "model.n_future=1", f"parallel.zero_stage={z_n1}"),
                variant("rc", "parallel.recompute=true", f"parallel.zero_stage={z_rc}"),
                variant("bf16", *BF16)]

    return [
        ("tp2", 2, 1, 2, [*std(0, 1, 0), source(0), variant("sp", SP, "parallel.zero_stage=2"),
                          variant("sp_bf16", SP, *BF16)]),
        ("dp2", 1, 1, 2, [*std(2, 1, 2), source(1)]),
        ("pp2", 1, 2, 2, std(0, 1, 1)),
        ("tp2pp2", 2, 2, 4, [*std(1, 0, 0), variant("sp", SP, "parallel.recompute=true", "parallel.zero_stage=1"),
                             source(0), target("from_dp2", "dp2", 0, base),
                             target("same", "tp2pp2", 0, base), source(1, "bf16src", *BF16[:1]),
                             target("bf16same", "tp2pp2", 1, base, *BF16[:1], run="bf16src")]),
        ("pp2dp2", 1, 2, 4, [*std(1, 0, 1)[:3], target("from_tp2", "tp2", 1, base)]),
        ("single", 1, 1, 1, [*std(0, 0, 0), target("from_tp2pp2", "tp2pp2", 0, base),
                             target("bf16_from_tp2pp2", "tp2pp2", 1, base, *BF16[:1], run="bf16src")]),
    ]


LAYOUTS = ["tp2", "dp2", "pp2", "tp2pp2", "pp2dp2"]
BF16_LAYOUTS = ["tp2", "dp2", "pp2", "tp2pp2"]
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


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: list[int], rel: float = LOSS_RTOL) -> None:
    for step in steps:
        keys = [k for k in want[step] if k.startswith("loss") or k == "grad_norm"]
        assert len(keys) >= 3, keys
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=rel), f"step {step} {key}"


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


@pytest.mark.parametrize("layout, name, reference", [("tp2", "sp", "n4"), ("tp2pp2", "sp", "rc"),
                                                     ("tp2", "sp_bf16", "bf16")])
def test_sequence_parallel_matches_single_process(runs, layout, name, reference):
    base, logs = runs
    assert "sequence-parallel" in logs[layout]
    rel = BF16_RTOL if reference == "bf16" else LOSS_RTOL
    assert_same_steps(metrics(base / layout / name), metrics(base / "single" / reference), [1, 2, 3], rel=rel)
    if reference != "bf16":
        assert_same_weights(final_weights(base / layout / name), final_weights(base / "single" / reference))


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
def test_bf16_layout_matches_single_process_bf16(runs, layout):
    base, _ = runs
    got, want = metrics(base / layout / "bf16"), metrics(base / "single" / "bf16")
    assert_same_steps(got, want, [1, 2, 3], rel=BF16_RTOL)
    fp32 = metrics(base / "single" / "n4")
    assert got[1]["loss"] != fp32[1]["loss"], "the bf16 run must really compute in bf16"


def test_bf16_weights_are_bf16_and_master_weights_fp32(runs):
    """The checkpoint of a bf16 run: bf16 module weights, fp32 master weights and Adam moments."""
    base, _ = runs
    engine = base / "single" / "bf16" / "checkpoints" / "step_000003" / "engine"
    module = torch.load(engine / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    weights = [v for v in module.values() if torch.is_tensor(v)]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    optim = torch.load(engine / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    masters = optim["single_partition_of_fp32_groups"]
    moments = [t for state in optim["base_optimizer_state"]["state"].values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert sum(m.numel() for m in masters) == sum(w.numel() for w in weights)


def test_bf16_checkpoint_resumes_under_another_layout(runs):
    """tp=2 x pp=2 bf16 (BF16_Optimizer files) resharded into one process: masters and moments carried over."""
    base, logs = runs
    assert f"resharding {base / 'single' / 'bf16_from_tp2pp2' / 'checkpoints' / 'step_000002'}" in logs["single"]
    got, want = metrics(base / "single" / "bf16_from_tp2pp2"), metrics(base / "tp2pp2" / "bf16src")
    assert sorted(got) == [3]
    assert_same_steps(got, want, [3], rel=BF16_RTOL)


def test_bf16_resume_under_the_same_layout_is_exact(runs):
    base, logs = runs
    step2 = base / "tp2pp2" / "bf16same" / "checkpoints" / "step_000002"
    assert f"resumed from {step2}" in logs["tp2pp2"] and f"resharding {step2}" not in logs["tp2pp2"]
    got, want = metrics(base / "tp2pp2" / "bf16same"), metrics(base / "tp2pp2" / "bf16src")
    assert sorted(got) == [3]
    assert_same_steps(got, want, [3], rel=0)


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
    got, want = metrics(base / layout / resumed), metrics(base / saved_by / "src")
    assert sorted(got) == [3], "the resumed run must start at step 3"
    assert_same_steps(got, want, [3])
    assert_same_weights(final_weights(base / layout / resumed), final_weights(base / saved_by / "src"))


def test_resume_under_the_same_pipeline_layout(runs):
    """Same tp=2 x pp=2 layout: DeepSpeed's own pipeline loader, no resharding, and the same step 3."""
    base, logs = runs
    step2 = base / "tp2pp2" / "same" / "checkpoints" / "step_000002"
    assert f"resumed from {step2}" in logs["tp2pp2"] and f"resharding {step2}" not in logs["tp2pp2"]
    got, want = metrics(base / "tp2pp2" / "same"), metrics(base / "tp2pp2" / "src")
    assert sorted(got) == [3]
    assert_same_steps(got, want, [3])
    assert_same_weights(final_weights(base / "tp2pp2" / "same"), final_weights(base / "tp2pp2" / "src"))


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

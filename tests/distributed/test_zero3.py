"""ZeRO-3 (pp=1) against the single-process run, through the real `mtp train`, and its gradients directly.

ZeRO-3 partitions every weight over the data-parallel ranks and gathers it
only around its module's forward and backward; the MTP loss reads the
heads' and unembedding's weights outside those calls (pretrain.model.mtp.LossScope).
Three torchrun launches of tests/distributed/layout_worker.py, as in
test_layouts.py (gloo, float32, tiny model on real stdlib code, three
optimizer steps with clipping active): one process at ZeRO-0 (the
reference), dp=2 and tp=2 x dp=2 at ZeRO-3. Every step's loss, every head's
loss and the gradient norm must equal the reference's, and so must the final
weights, read back from the ZeRO-3 checkpoint by DeepSpeed's own
`zero_to_fp32`. DeepSpeed keeps weights under 1e5 elements (all of this
tiny model's) whole after their first gather, so these launches set
`stage3_param_persistence_threshold: 0`: every weight stays partitioned.

Variants: n4, n1 (n_future=1 with micro-batches of 2: gradient accumulation
under ZeRO-3), rc (recomputation), seq (sequential heads, which also read
the embedding in the loss), and at tp=2 x dp=2 n4 and sp (n4 with
sequence parallelism: every norm gain's gradient summed over the tensor
ranks inside autograd while ZeRO-3 holds the gain gathered). `src` saves step 2 and `same` resumes it under
the same dp=2 ZeRO-3 layout (DeepSpeed's own loader). Plus one backward at
dp=2 compared parameter by parameter with a plain model's gradients
(tests/distributed/zero3_grads_worker.py).

Run: .venv/bin/python -m pytest -q tests/distributed/test_zero3.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.test_layouts import (
    REPO,
    TINY,
    assert_same_steps,
    assert_same_weights,
    final_weights,
    launch,
    metrics,
    source,
    target,
    variant,
)

ZERO3 = "parallel.zero_stage=3"
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
GRAD_RTOL = 1e-5  # ||g - g_plain|| / ||g_plain|| of every parameter (observed <= 3e-7)
VARIANTS = {
    "n4": [],
    "n1": ["model.n_future=1", "train.micro_batch_size=2"],
    "rc": ["parallel.recompute=true"],
    "seq": ["model.head_type=sequential"],
}


def plans(base: Path) -> list[tuple[str, int, int, list[dict], dict | None]]:
    """(name, tp, processes, variants, plan extras) in launch order."""
    zero3 = [variant(name, *overrides, ZERO3) for name, overrides in VARIANTS.items()]
    return [
        ("single", 1, 1, [variant(name, *overrides) for name, overrides in VARIANTS.items()], None),
        ("dp2", 1, 2, [*zero3, source(3), target("same", "dp2", 3, base)], PARTITION_ALL),
        ("tp2dp2", 2, 4, [variant("n4", *VARIANTS["n4"], ZERO3),
                          variant("sp", "parallel.sequence_parallel=true", ZERO3)], PARTITION_ALL),
    ]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("zero3")
    logs = {name: launch(base, tiny_corpus, name, tp, 1, world, variants, extra)
            for name, tp, world, variants, extra in plans(base)}
    return base, logs


def zero3_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Whole fp32 weights of a ZeRO-3 run's step 3, consolidated as `mtp export` does."""
    from parallel.reshard import zero3_model_state

    return zero3_model_state(str(run_dir / "checkpoints" / "step_000003"))


@pytest.mark.parametrize("layout, name, reference", [*(("dp2", name, name) for name in VARIANTS),
                                                     ("tp2dp2", "n4", "n4"), ("tp2dp2", "sp", "n4")])
def test_zero3_matches_single_process(runs, layout, name, reference):
    base, _ = runs
    assert_same_steps(metrics(base / layout / name), metrics(base / "single" / reference), [1, 2, 3])
    assert_same_weights(zero3_weights(base / layout / name), final_weights(base / "single" / reference))


def test_zero3_resumes_under_its_own_layout(runs):
    """Step 2 of a dp=2 ZeRO-3 run, resumed by DeepSpeed's own loader, takes the same step 3."""
    base, logs = runs
    step2 = base / "dp2" / "same" / "checkpoints" / "step_000002"
    assert f"resumed from {step2}" in logs["dp2"] and f"resharding {step2}" not in logs["dp2"]
    got, want = metrics(base / "dp2" / "same"), metrics(base / "dp2" / "src")
    assert sorted(got) == [3], "the resumed run must start at step 3"
    assert_same_steps(got, want, [3])
    assert_same_weights(zero3_weights(base / "dp2" / "same"),
                        zero3_weights(base / "dp2" / "src"))


def test_zero3_checkpoints_describe_whole_shapes_and_refuse_other_layouts(runs):
    """Layout records hold each weight's whole shape (not ZeRO-3's empty placeholder); resharding is refused."""
    from parallel.reshard import SavedCheckpoint
    from pretrain.errors import UserError

    base, _ = runs

    def shapes(run: Path) -> dict[str, list[int]]:
        record = json.loads((run / "checkpoints" / "step_000003" / "layout" / "pp00_tp00.json").read_text())
        return {p["name"]: p["shape"] for p in record["params"]}

    assert shapes(base / "dp2" / "n4") == shapes(base / "single" / "n4")
    with pytest.raises(UserError, match="ZeRO-3 checkpoint, which resumes only under its own layout"):
        SavedCheckpoint(str(base / "dp2" / "src" / "checkpoints" / "step_000002"))


def test_zero3_gradients_equal_a_plain_model(tmp_path):
    """One dp=2 backward with every weight partitioned: each parameter's full gradient equals a plain model's."""
    out = tmp_path / "grads.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "tests/distributed/zero3_grads_worker.py",
         str(out), *TINY, "model.vocab_size=258"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert result["partitioned"], "every weight must be partitioned for the check to mean anything"
    assert len(result["grads"]) == 39  # 2 trunk layers and 4 heads of 6 weights, embedding, final norm, unembedding
    worst = max(result["grads"], key=result["grads"].get)
    assert result["grads"][worst] <= GRAD_RTOL, f"{worst}: relative difference {result['grads'][worst]:.2e}"
    assert result["head_losses"] <= 1e-6


def test_zero3_checkpoint_exports_the_single_process_weights(runs, tmp_path):
    """`mtp export` consolidates a ZeRO-3 checkpoint (DeepSpeed's partitions) into the whole model."""
    from safetensors.torch import load_file

    from tests.integration.conftest import run_mtp

    base, _ = runs
    out = tmp_path / "zero3.safetensors"
    run_mtp("export", "--checkpoint", str(base / "dp2" / "n4" / "checkpoints" / "step_000003"), "--out", str(out))
    exported, want = load_file(str(out)), final_weights(base / "single" / "n4")
    assert_same_weights({name: exported[name][: ref.shape[0]] for name, ref in want.items()}, want)

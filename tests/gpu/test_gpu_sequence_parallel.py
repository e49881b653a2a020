"""Sequence parallelism on CUDA/NCCL: tp=2 with it against one GPU, through the real `mtp train`.

The CPU suite holds megatron's sequence-parallel layers to the one-process
run under gloo (tests/distributed/test_layouts.py); on GPUs its buffers are
CUDA memory and its all-gathers and reduce-scatters NCCL's. Needs two GPUs
(NCCL puts one rank on each), so `make gpu-check` on one GPU skips it; run
it on a machine with two:

    .venv/bin/python -m pytest -q -m gpu tests/gpu/test_gpu_sequence_parallel.py
"""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.gpu.test_gpu_runtime import TINY, metrics
from tests.integration.conftest import REPO, mtp_env, run_mtp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

FP32 = ["parallel.dtype=float32", "parallel.zero_stage=0"]
CASES = {"fp32": (FP32, 1e-4), "bf16": ([], 2.0**-6)}  # bf16 tolerance: tests/distributed/test_layouts.py


def train(run_dir: Path, data: Path, world: int, *overrides: str) -> Path:
    import subprocess

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(world), "-m", "pretrain.cli", "train",
           "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={data}", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=mtp_env(CUDA_VISIBLE_DEVICES="0,1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return run_dir


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_tp2_matches_one_gpu(small_corpus, tmp_path, case):
    overrides, rel = CASES[case]
    one = tmp_path / "one"
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, *overrides, f"data.dir={small_corpus}",
            f"run.dir={one}", env=mtp_env(CUDA_VISIBLE_DEVICES="0"))
    sp = train(tmp_path / "sp", small_corpus, 2, "parallel.tp=2", "parallel.sequence_parallel=true", *overrides)
    assert yaml.safe_load((sp / "config.yaml").read_text())["parallel"]["sequence_parallel"] is True
    got, want = metrics(sp), metrics(one)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step, row in want.items():
        for key in [k for k in row if k.startswith("loss") or k == "grad_norm"]:
            assert got[step][key] == pytest.approx(row[key], rel=rel), f"step {step} {key}"

"""The bf16 contracts on CUDA/NCCL with one GPU: the same commands the CPU suite runs, on the GPU path.

Marked `gpu` and skipped without CUDA; `make gpu-check` runs them first.
A tiny n=4 model trains in bf16 (ZeRO-1: fp32 master weights, fp32
gradient accumulation) through the real `mtp train` on one GPU, resumes
from its step-2 checkpoint to the same step-4 losses bit for bit, exports,
and generates: speculative greedy output equals plain greedy output.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import mtp_env, run_mtp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = [
    "model.d_model=128", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=128", "model.n_future=4",
    "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=4",
    "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=2", "schedule.warmup_steps=1",
    "optimizer.lr=3e-3", "tracking.enabled=false", "parallel.dtype=bfloat16", "parallel.zero_stage=1",
]


def metrics(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gpu") / "bf16"
    out = run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}",
                  f"run.dir={run_dir}", env=mtp_env(CUDA_VISIBLE_DEVICES="0"))
    assert "step 4/4" in out.stdout
    return run_dir


def test_runtime_picks_the_gpu_nccl_and_deepspeeds_cuda_accelerator():
    import subprocess
    import sys

    code = ("from parallel.runtime import start\n"
            "rt = start(1, 1, 'bfloat16', 60)\n"
            "import torch, torch.distributed as dist\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "print(rt.device, dist.get_backend(), get_accelerator()._name, torch.cuda.current_device())\n")
    out = subprocess.run([sys.executable, "-c", code], env=mtp_env(CUDA_VISIBLE_DEVICES="0"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["cuda:0", "nccl", "cuda", "0"]


def test_bf16_checkpoint_holds_bf16_weights_and_fp32_masters(trained):
    engine = trained / "checkpoints" / "step_000004" / "engine"
    module = torch.load(engine / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(v.dtype == torch.bfloat16 for v in module.values() if torch.is_tensor(v))
    optim = torch.load(engine / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    assert all(t.dtype == torch.float32 for t in optim["single_partition_of_fp32_groups"])


def test_bf16_resume_on_gpu_is_exact(trained, small_corpus, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}", f"run.dir={resumed}",
            env=mtp_env(CUDA_VISIBLE_DEVICES="0"))
    got, want = metrics(resumed), metrics(trained)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in [k for k in want[step] if k.startswith("loss")]:
            assert got[step][key] == want[step][key], f"step {step} {key}"


def test_export_and_speculative_identity_on_gpu(trained, tmp_path):
    model = tmp_path / "model.safetensors"
    run_mtp("export", "--checkpoint", str(trained), "--out", str(model))
    args = ["generate", "--model", str(model), "--prompt", "def parse(self, text):", "--max-new-tokens", "24"]
    for dtype in ("float32", "bfloat16"):
        plain = run_mtp(*args, "--dtype", dtype, "--speculative", "off", env=mtp_env(CUDA_VISIBLE_DEVICES="0"))
        spec = run_mtp(*args, "--dtype", dtype, "--speculative", "4", env=mtp_env(CUDA_VISIBLE_DEVICES="0"))
        assert spec.stdout == plain.stdout, dtype


def test_bf16_model_on_gpu_matches_the_naive_loss():
    from parallel.megatron_setup import init_model_parallel
    from pretrain.loss import naive_mtp_loss
    from pretrain.model.config import ModelConfig
    from pretrain.model.mtp import MTPModel

    init_model_parallel()
    cfg = ModelConfig(vocab_size=1000, d_model=32, n_layers=3, n_heads=4, n_future=2, loss_chunk_tokens=64)
    model = MTPModel(cfg, params_dtype=torch.bfloat16).cuda()  # built on the CPU, as generation does
    seq = torch.randint(0, 1000, (4, 130), device="cuda")
    ids = seq[:, :128]
    labels = torch.stack([seq[:, k + 1 : k + 129] for k in range(2)], dim=1)
    loss, head_losses = model(ids, labels)
    z = model.trunk(ids)
    targets = labels.permute(1, 2, 0).contiguous()
    stack = model.head_stack(128, z.device, lambda i, _: targets[i].clamp(min=0))
    _, naive_heads = naive_mtp_loss(z, targets, stack, model.cfg.head_scales(0))
    torch.testing.assert_close(head_losses, naive_heads, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())

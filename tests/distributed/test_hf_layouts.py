"""`model.init_from=hf:` under tensor x pipeline parallelism, and `mtp export --format hf` of that checkpoint.

One torchrun launch of 4 gloo processes (tp=2, pp=2) starts from a Llama
made here (GQA, so every tensor-parallel rank holds one query group of the
fused QKV; SwiGLU's gate/up split over ranks): each rank writes only its
slices of the logical state. The tp=2 x pp=2 checkpoint is then exported,
and every Llama tensor must come back bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.hf.tokenizer import byte_level_core
from tests.hf_llama import llama_weights, make_llama

REPO = Path(__file__).resolve().parents[2]
NO_CHANGE = ["train.max_steps=1", "optimizer.lr=1e-30", "optimizer.weight_decay=0", "train.eval_interval=0",
             "checkpoint.interval=1", "schedule.warmup_steps=1", "train.seq_len=32", "model.max_seq_len=64",
             "train.global_batch_size=4", "train.micro_batch_size=4", "tracking.enabled=false"]


def env() -> dict[str, str]:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        out.pop(key, None)
    return out


def test_import_into_tp2_pp2_and_export_gives_back_the_llama(tiny_corpus, tmp_path):
    tokenizer_json = tmp_path / "tokenizer.json"
    byte_level_core(ByteTokenizer()).save(str(tokenizer_json))  # the corpus's byte ids, as a Hub tokenizer
    llama = make_llama(tmp_path / "llama", tokenizer_json, layers=3, kv_heads=2)
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    train = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", "-m", "pretrain.cli", "train",
         "--config", "configs/tiny-cpu.yaml", f"model.init_from=hf:{llama}", "model.n_future=2",
         "parallel.tp=2", "parallel.pp=2", *NO_CHANGE, f"data.dir={tiny_corpus}", f"run.dir={run_dir}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=900,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-6000:]
    assert f"initialising from hf:{llama}" in train.stdout
    out = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "export", "--format", "hf", "--checkpoint", str(run_dir),
         "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )
    assert export.returncode == 0, export.stderr[-6000:]
    original, back = llama_weights(llama), llama_weights(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

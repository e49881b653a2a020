"""The runtime decision and the step's figures as a user meets them: `mtp train` on this CPU machine."""

import json

import pytest

from tests.integration.conftest import mtp_env, run_mtp

TINY = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=2",
    "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=2",
    "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=2", "schedule.warmup_steps=1",
    "tracking.enabled=false",
]


def test_a_short_run_reports_its_runtime_memory_and_data_wait(small_corpus, tmp_path):
    out = run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}",
                  f"run.dir={tmp_path / 'run'}")
    assert "runtime: 1 process(es) on cpu (gloo), float32, torch kernels" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["step_s"] > 0 and 0 <= row["data_wait_s"] < row["step_s"]
        assert row["peak_memory_gb"] > 0  # the resident peak on a CPU; the allocator's on a GPU
        assert "mfu" not in row  # no known peak for a CPU: no guess
    assert "| mem " in out.stdout and "| data " in out.stdout


@pytest.mark.parametrize("extra, env, fragment", [
    (["model.kernels=te"], {}, "model.kernels=te needs a CUDA GPU"),
    (["model.kernels=apex"], {}, "model.kernels=apex needs a CUDA GPU"),
    ([], {"DS_ACCELERATOR": "cuda"}, "DS_ACCELERATOR=cuda but this process sees no CUDA GPU"),
    ([], {"DS_ACCELERATOR": "npu"}, "DS_ACCELERATOR=npu is not supported here"),
])
def test_runtime_mistakes_are_one_line(small_corpus, tmp_path, extra, env, fragment):
    out = run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, *extra, f"data.dir={small_corpus}",
                  f"run.dir={tmp_path / 'run'}", env=mtp_env(**env), check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

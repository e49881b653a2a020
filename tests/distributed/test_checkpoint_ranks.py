"""Checkpoints across ranks, through the real `mtp train` under torchrun (gloo, CPU).

- A file written by rank 1 only is damaged (one flipped byte, same size): rank 1 finds it while the
  ranks verify their own files in parallel, every rank falls back to the same older checkpoint, and the
  losses after the fallback equal those of an uninterrupted run. Two ranks (dp=2) and four (tp=2 x dp=2).
- A checkpoint written in the background (`checkpoint.async`) by two ranks resumes in one process through
  the resharding loader: DeepSpeed's file format, whoever wrote it when.
- A write error (ENOSPC, injected on rank 1) ends every rank with one line naming the rank, the
  checkpoint and the newest complete one; the partial checkpoint is removed, nothing older touched.

Run: .venv/bin/python -m pytest -q tests/distributed/test_checkpoint_ranks.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.max_steps=8", "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=4",
    "checkpoint.keep=5", "schedule.warmup_steps=2", "optimizer.lr=3e-3", "tracking.enabled=false",
    "parallel.zero_stage=1", "fault.collective_timeout_s=60",
]
LAYOUTS = {2: ["parallel.tp=1"], 4: ["parallel.tp=2"]}  # dp=2 each; with 4 ranks rank 1 is a tensor-parallel peer


def torchrun(nproc: int, run_dir: Path, data: Path, *extra: str,
             fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MTP_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **({"MTP_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "pretrain.cli", "train", "--config", "configs/tiny-cpu.yaml", *TINY,
           *LAYOUTS[nproc], f"data.dir={data}", f"run.dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[f"loss_head{k}"] for row in rows for k in range(1, 5)]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def runs(request, tiny_corpus, tmp_path_factory) -> tuple[int, Path, Path]:
    """(ranks, uninterrupted run, the same run as it stood after step 8 of 12) for one layout.

    The second is the first cut back to step 8 (its step-12 checkpoint and metrics rows 9-12 removed):
    what a run stopped there leaves, without training the same eight steps again.
    """
    nproc, root = request.param, tmp_path_factory.mktemp(f"ranks{request.param}")
    full = root / "full"
    done = torchrun(nproc, full, tiny_corpus, "train.max_steps=12")
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = root / "stopped"
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step_000012")
    rows = (stopped / "metrics.jsonl").read_text().splitlines(keepends=True)
    (stopped / "metrics.jsonl").write_text("".join(row for row in rows if json.loads(row)["step"] <= 8))
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step_000004", "step_000008"]
    return nproc, full, stopped


def test_damage_in_one_ranks_file_is_found_by_that_rank_and_all_fall_back_together(runs, tiny_corpus):
    nproc, full, stopped = runs
    newest = stopped / "checkpoints" / "step_000008"
    manifest = json.loads((newest / "manifest.json").read_text())
    rel = max((r for r, e in manifest["files"].items() if e["rank"] == 1 and r.endswith(".pt")),
              key=lambda r: manifest["files"][r]["size"])
    victim = newest / rel
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only its writer's checksum finds it
    victim.write_bytes(bytes(data))

    done = torchrun(nproc, stopped, tiny_corpus, "train.max_steps=12")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert f"skipping checkpoint {newest}: rank 1 found {rel} does not match its xxh3_128 in the manifest" in out
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed == [f"resumed from {stopped / 'checkpoints' / 'step_000004'} at step 4"], resumed
    assert losses(stopped) == pytest.approx(losses(full), rel=1e-6)


def test_a_write_error_on_one_rank_fails_every_rank_with_one_line(tiny_corpus, tmp_path):
    run_dir = tmp_path / "enospc"
    done = torchrun(2, run_dir, tiny_corpus, "checkpoint.interval=2", fault="enospc-in-save@4:1")
    assert done.returncode != 0
    failures = {line for line in done.stderr.splitlines() if "mtp train: failed:" in line}
    assert len(failures) == 1, failures  # every rank says the same line
    (line,) = failures
    assert "step 4: no space left on device (" in line and "on rank 1 writing checkpoint step_000004" in line
    assert "the newest complete checkpoint is step_000002" in line
    assert not [x for x in done.stderr.splitlines() if x.startswith("[rank") and "Traceback" in x], \
        "no rank may die with a traceback (torchrun's own report of the exit status follows)"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002"]


def test_an_asynchronously_written_checkpoint_reshards_into_one_process(tiny_corpus, tmp_path):
    source = tmp_path / "async"
    done = torchrun(2, source, tiny_corpus, "train.max_steps=6", "checkpoint.async=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint {source / 'checkpoints' / 'step_000004'} (written in the background" in done.stdout
    target = tmp_path / "one-process"
    shutil.copytree(source / "checkpoints" / "step_000004", target / "checkpoints" / "step_000004")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MTP_FAULT")}
    one = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "--config", "configs/tiny-cpu.yaml", *TINY,
         "train.max_steps=6", "parallel.zero_stage=0", f"data.dir={tiny_corpus}", f"run.dir={target}"],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resharding" in one.stdout and "resumed from" in one.stdout
    assert losses(target)[-8:] == pytest.approx(losses(source)[-8:], rel=1e-5)  # steps 5 and 6, every head

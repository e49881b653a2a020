"""Checkpoints of real `mtp train` runs: damage refused without touching anything, --from-scratch, offline
verification, asynchronous saves (the next save, a stop signal and the end wait for the one in flight),
and a really full disk.
"""

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import MTP, REPO, mtp_env, run_mtp
from tests.integration.test_train import head_losses, metrics
from tests.tmpfs import small_tmpfs

TINY = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.max_steps=6", "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=2",
    "checkpoint.keep=5", "schedule.warmup_steps=2", "optimizer.lr=3e-3", "tracking.enabled=false",
]


def train(run_dir: Path, data: Path, *extra: str, env: dict | None = None, check: bool = True):
    return run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={data}", f"run.dir={run_dir}",
                   *extra, env=env, check=check)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def largest(step_dir: Path) -> Path:
    return max(step_dir.rglob("*.pt"), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> Path:
    """Six synchronous steps, checkpoints at 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "reference"
    train(run_dir, small_corpus)
    return run_dir


def test_verify_passes_an_intact_run(reference):
    out = run_mtp("checkpoint", "verify", str(reference))
    assert out.stdout.count(": whole (") == 3 and "all 3 checkpoint(s) whole" in out.stdout


def test_every_checkpoint_damaged_refuses_and_touches_nothing(reference, small_corpus, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_000006" / "COMPLETE").unlink()  # the marker alone is lost, the files are intact
    truncated = largest(ckpts / "step_000004")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flipped = largest(ckpts / "step_000002")
    flip_byte(flipped)
    before = snapshot(run_dir)

    out = train(run_dir, small_corpus, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("mtp train: error: no checkpoint in ") and "Traceback" not in out.stderr
    line = lines[-1]
    assert "step_000006: only its COMPLETE marker is missing, every file matches its manifest" in line
    assert f"step_000004: {truncated.relative_to(ckpts / 'step_000004')} has 1000 bytes" in line
    assert f"step_000002: rank 0 found {flipped.relative_to(ckpts / 'step_000002')} does not match its xxh3_128" in line
    assert "--from-scratch" in line and "nothing was changed" in line
    assert snapshot(run_dir) == before, "a refused run must not change a single file"

    verify = run_mtp("checkpoint", "verify", str(run_dir), check=False)
    assert verify.returncode == 1
    assert f"{truncated.relative_to(ckpts / 'step_000004')} has 1000 bytes" in verify.stderr
    assert f"{flipped.relative_to(ckpts / 'step_000002')} does not match its xxh3_128" in verify.stderr
    assert "step_000006: only its COMPLETE marker is missing" in verify.stderr
    assert "3 of 3 checkpoint(s) damaged" in verify.stderr

    fresh = train(run_dir, small_corpus, "--from-scratch")
    assert "starting from scratch: the earlier checkpoints and logs are in" in fresh.stdout
    assert "resumed from" not in fresh.stdout and [r["step"] for r in metrics(run_dir)] == list(range(1, 7))
    (aside,) = (ckpts / "set-aside").iterdir()
    moved = snapshot(aside)
    assert moved["metrics.jsonl"] == before["metrics.jsonl"]
    assert all(moved[rel.removeprefix("checkpoints/")] == data for rel, data in before.items()
               if rel.startswith("checkpoints/step_"))
    assert head_losses(metrics(run_dir), 4) == pytest.approx(head_losses(metrics(reference), 4), rel=1e-6)


def test_a_damaged_newest_checkpoint_falls_back_and_is_kept(reference, small_corpus, tmp_path):
    run_dir = tmp_path / "fallback"
    shutil.copytree(reference, run_dir)
    victim = largest(run_dir / "checkpoints" / "step_000006")
    flip_byte(victim)
    out = train(run_dir, small_corpus, "train.max_steps=8")
    assert "skipping checkpoint" in out.stderr and "does not match its xxh3_128" in out.stderr
    assert "resumed from" in out.stdout and "step_000004" in out.stdout
    # The damaged step-6 checkpoint was moved aside when the new step 6 was sealed, not deleted.
    (aside,) = (run_dir / "checkpoints" / "set-aside").iterdir()
    assert aside.name.startswith("step_000006.replaced-")
    assert (aside / victim.relative_to(run_dir / "checkpoints" / "step_000006")).read_bytes() != victim.read_bytes()
    assert run_mtp("checkpoint", "verify", str(run_dir / "checkpoints" / "step_000008")).returncode == 0


def test_async_saves_wait_for_the_one_in_flight_and_equal_synchronous_ones(reference, small_corpus, tmp_path):
    """The step-2 write is held until the step-4 save needs it: that save waits and says so."""
    run_dir = tmp_path / "async"
    out = train(run_dir, small_corpus, "checkpoint.async=true", env=mtp_env(MTP_FAULT="slow-save@2"))
    assert "holds the checkpoint write of step 2" in out.stdout
    assert "checkpoint step 4: waiting for the checkpoint of step 2, still being written" in out.stdout
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))] == [
        "step_000002", "step_000004", "step_000006"]
    assert head_losses(metrics(run_dir), 4) == head_losses(metrics(reference), 4)
    assert run_mtp("checkpoint", "verify", str(run_dir)).returncode == 0
    resumed = train(run_dir, small_corpus, "checkpoint.async=true", "train.max_steps=8")
    assert "resumed from" in resumed.stdout and "step_000006" in resumed.stdout


def test_sigusr1_while_a_save_is_in_flight_waits_for_it_then_checkpoints(small_corpus, tmp_path):
    run_dir = tmp_path / "usr1"
    cmd = [*MTP, "train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}",
           f"run.dir={run_dir}", "train.max_steps=100000", "checkpoint.async=true"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=mtp_env(MTP_FAULT="slow-save@2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    held = trained_on = False
    try:
        for line in proc.stdout:  # the step-2 write is held in flight from its announcement until the trainer waits
            lines.append(line)
            held = held or "holds the checkpoint write of step 2" in line
            trained_on = trained_on or re.match(r"step ([3-9]|\d\d+)/", line) is not None
            if held and trained_on:  # step 3 trained while the write is held: stop now
                proc.send_signal(signal.SIGUSR1)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, err[-3000:]
    assert "waiting for the checkpoint of step 2, still being written" in out and "stop signal received" in out
    last = metrics(run_dir)[-1]["step"]
    assert last >= 3, "training went on while the step-2 checkpoint was being written"
    sealed = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert sealed[0] == "step_000002" and sealed[-1] == f"step_{last:06d}"
    assert run_mtp("checkpoint", "verify", str(run_dir)).returncode == 0


def test_a_full_disk_ends_with_one_line_and_keeps_the_previous_checkpoint(reference, small_corpus, tmp_path):
    one = sum((p.stat().st_size + 4095) // 4096 * 4096 for p in (reference / "checkpoints" / "step_000002").rglob("*"))
    with small_tmpfs(tmp_path, one * 3 // 2) as disk:  # room for one checkpoint, not two
        run_dir = tmp_path / "full"
        out = train(run_dir, small_corpus, f"checkpoint.dir={disk}", check=False)
        assert out.returncode == 1, out.stderr[-3000:]
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("mtp train: failed:")]
        assert line.startswith("mtp train: failed: step 4: no space left on device (")
        assert "writing checkpoint step_000004; the newest complete checkpoint is step_000002" in line
        assert "Traceback" not in out.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["step_000002"], "the partial temp dir is removed"
        assert run_mtp("checkpoint", "verify", str(disk)).returncode == 0

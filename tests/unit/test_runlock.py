"""The run-directory lock: one holder, refusals that name it, takeovers of holders that are gone."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.errors import UserError
from pretrain.runlock import HOLDER_NAME, LOCK_NAME, RunLock, this_process

HOLD = """
import os, sys, time
from pretrain.runlock import RunLock
RunLock(sys.argv[1], 120).acquire()
print("locked", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def holder_process(tmp_path):
    """A real other process holding the lock of tmp_path/run (SLURM job 77 in its environment)."""
    env = dict(os.environ, SLURM_JOB_ID="77")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, holder_process):
    with pytest.raises(UserError) as refused:
        RunLock(str(tmp_path / "run"), 120).acquire()
    message = str(refused.value)
    assert f"PID {holder_process.pid}" in message and "SLURM job 77" in message and this_process().host in message
    assert "\n" not in message


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, holder_process, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder_process.kill()
    holder_process.wait()
    with caplog.at_level(logging.WARNING, logger="pretrain.runlock"):
        lock = RunLock(str(tmp_path / "run"), 120).acquire()
    assert f"PID {holder_process.pid}" in caplog.text and "no longer runs" in caplog.text
    assert json.loads((tmp_path / "run" / HOLDER_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert not list((tmp_path / "run").glob(f"{LOCK_NAME}|*")), "claim files of both holders are removed"


def test_a_requeued_attempt_of_the_same_job_takes_over_silently(tmp_path, holder_process, caplog, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    holder_process.kill()  # the earlier attempt's processes are gone when SLURM starts the next
    holder_process.wait()
    with caplog.at_level(logging.INFO, logger="pretrain.runlock"):
        lock = RunLock(str(tmp_path / "run"), 120).acquire()
    assert "earlier round of this job" in caplog.text and "no longer runs" not in caplog.text
    lock.release()


def test_a_live_holder_of_the_same_job_on_this_host_is_refused(tmp_path, holder_process, monkeypatch):
    """The same command launched twice (same SLURM job or rendezvous id) while the first still runs."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(UserError, match=f"PID {holder_process.pid}"):
        RunLock(str(tmp_path / "run"), 120).acquire()


def fake_remote_lock(run_dir: Path, host: str, renewed_s_ago: float, lifetime_s: int) -> None:
    """The lock as flufl.lock leaves it when a process on `host` holds it (expiry = renewal + lifetime)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / f"{LOCK_NAME}|{host}|4242|17"
    claim.write_text(str(claim))
    os.link(claim, run_dir / LOCK_NAME)
    expires = time.time() - renewed_s_ago + lifetime_s
    os.utime(claim, (expires, expires))
    (run_dir / HOLDER_NAME).write_text(json.dumps(
        {"host": host, "pid": 4242, "job": "9", "attempt": None, "launch": None}))


def test_a_remote_holder_is_refused_while_its_heartbeat_is_fresh(tmp_path):
    fake_remote_lock(tmp_path / "run", "node-b.example", renewed_s_ago=5, lifetime_s=60)
    with pytest.raises(UserError, match=r"host node-b.example, PID 4242, SLURM job 9, heartbeat \d+ s ago"):
        RunLock(str(tmp_path / "run"), 60).acquire()


def test_a_remote_holder_without_a_heartbeat_is_taken_over(tmp_path, caplog):
    fake_remote_lock(tmp_path / "run", "node-b.example", renewed_s_ago=600, lifetime_s=60)
    with caplog.at_level(logging.WARNING, logger="pretrain.runlock"):
        lock = RunLock(str(tmp_path / "run"), 60).acquire()
    assert "node-b.example" in caplog.text and "more than fault.lock_timeout_s=60" in caplog.text
    lock.release()


def test_an_earlier_round_of_this_job_on_another_host_is_taken_over(tmp_path, caplog, monkeypatch):
    """Its PID cannot be checked from here; torchrun or SLURM started this round after that one ended."""
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    fake_remote_lock(tmp_path / "run", "node-b.example", renewed_s_ago=5, lifetime_s=60)
    with caplog.at_level(logging.INFO, logger="pretrain.runlock"):
        RunLock(str(tmp_path / "run"), 60).acquire().release()
    assert "earlier round of this job" in caplog.text


def test_the_heartbeat_notices_a_lock_taken_away(tmp_path):
    lock = RunLock(str(tmp_path / "run"), 4).acquire()  # renewed every second
    (tmp_path / "run" / LOCK_NAME).unlink()  # broken by another host, as if this process had been frozen for long
    fake_remote_lock(tmp_path / "run", "node-b.example", renewed_s_ago=0, lifetime_s=60)
    deadline = time.monotonic() + 60
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lock.lost is not None and "node-b.example" in lock.lost
    lock.release()
    assert (tmp_path / "run" / LOCK_NAME).exists(), "the new holder's lock is left alone"


def test_release_without_a_holder_leaves_nothing(tmp_path):
    with RunLock(str(tmp_path / "run"), 30):
        assert (tmp_path / "run" / LOCK_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_the_holder_process_is_signalled_cleanly(tmp_path, holder_process):
    """A holder that ends by SIGTERM without releasing leaves a lock the next trainer here can take."""
    holder_process.send_signal(signal.SIGTERM)
    holder_process.wait()
    RunLock(str(tmp_path / "run"), 120).acquire().release()

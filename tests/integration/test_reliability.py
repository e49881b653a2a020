"""Real `mtp train` processes at the moments that used to go wrong: a second trainer on the same run
directory, a stop signal at every stage of a run, the tracking server going away, a full disk.

Every moment is reached deterministically: the trainer waits at a gate (`MTP_FAULT=gate@...`, see
pretrain/faults.py) until the test has done its part, and the test waits for the trainer's own lines.
"""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.bench.tmpfs import fill
from tests.integration import test_train
from tests.integration.conftest import MTP, REPO, mtp_env
from tests.integration.test_train import TINY, head_losses, metrics
from tests.tmpfs import small_tmpfs
from tests.unit.test_tracking import free_port, mlflow_server

full_run = test_train.full_run  # the same 20 undisturbed steps: the reference here too

WAIT_S = 600


class Trainer:
    """`mtp train` of the tiny config in the background, its output in files the test can poll."""

    def __init__(self, tmp_path: Path, name: str, run_dir: Path, data: Path, *extra: str, **env: str):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        cmd = [*MTP, "train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={data}", f"run.dir={run_dir}",
               *extra]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=mtp_env(**env), stdout=out, stderr=err)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while needle not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {needle!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} after {WAIT_S}s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        finally:
            self.proc.kill()

    def our_lines(self) -> list[str]:
        return [line for line in self.err.read_text().splitlines() if line.startswith("mtp train:")]


def gated(tmp_path: Path, spec: str) -> dict[str, str]:
    return {"MTP_FAULT": spec, "MTP_FAULT_GATE": str(tmp_path / "gate-{}")}


def open_gate(tmp_path: Path, label: str) -> None:
    (tmp_path / f"gate-{label}").touch()


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def test_a_second_trainer_on_the_same_run_dir_is_refused_at_once(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = Trainer(tmp_path, "first", run_dir, small_corpus, "tracking.enabled=false", "train.max_steps=3",
                    **gated(tmp_path, "gate@start"))
    first.wait_for("waits for")
    second = Trainer(tmp_path, "second", run_dir, small_corpus, "tracking.enabled=false")
    assert second.finish() == 2
    (line,) = second.our_lines()
    assert f"PID {first.proc.pid}" in line and "is in use by another trainer" in line
    assert "Traceback" not in second.text() and not (run_dir / "metrics.jsonl").exists()
    open_gate(tmp_path, "start")
    assert first.finish() == 0, first.text()[-3000:]
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3]
    assert not (run_dir / "run.lock").exists()


@pytest.mark.parametrize("moment, sig", [
    ("gate@start", signal.SIGTERM),  # process group up, nothing built
    ("gate-in-save@5", signal.SIGTERM),  # while the step-5 checkpoint is written
    ("gate@end", signal.SIGUSR1),  # after the last step
])
def test_a_stop_at_any_moment_of_a_fresh_run_ends_as_documented(moment, sig, small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(tmp_path, "run", run_dir, small_corpus, "tracking.enabled=false", "train.max_steps=8",
                      "checkpoint.interval=5", **gated(tmp_path, moment))
    trainer.wait_for("waits for")
    trainer.proc.send_signal(sig)  # the gate opens on the stop itself...
    if moment == "gate@end":
        open_gate(tmp_path, "end")  # ...except here: past the last step USR1 is ignored, as it must be
    assert trainer.finish() == 0, trainer.text()[-3000:]
    out = trainer.out.read_text()
    if moment == "gate@start":
        assert "stop signal received during start-up: nothing to checkpoint yet" in out
        assert not (run_dir / "checkpoints").exists() or not checkpoints(run_dir)
    elif moment.startswith("gate-in-save"):
        assert "stop signal received: checkpointed step 5, exiting" in out
        assert checkpoints(run_dir) == ["step_000005"] and [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]
    else:
        assert checkpoints(run_dir)[-1] == "step_000008" and "run " in out and "8 steps" in out


def test_a_stop_during_resume_keeps_the_checkpoint_and_exits_zero(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = Trainer(tmp_path, "first", run_dir, small_corpus, "tracking.enabled=false", "--stop-after", "5")
    assert first.finish() == 0, first.text()[-3000:]
    second = Trainer(tmp_path, "second", run_dir, small_corpus, "tracking.enabled=false",
                     **gated(tmp_path, "gate@resume"))
    second.wait_for("waits for")
    second.proc.send_signal(signal.SIGUSR1)
    assert second.finish() == 0, second.text()[-3000:]
    assert "nothing new to checkpoint (step 5)" in second.out.read_text()
    assert checkpoints(run_dir) == ["step_000005"] and [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_the_tracking_server_going_down_mid_run_neither_stalls_nor_loses_steps(small_corpus, tmp_path):
    """A real mlflow server stopped before step 6 and started again before step 14 of a 20-step run."""
    port = free_port()
    with mlflow_server(tmp_path, port) as uri:
        trainer = Trainer(tmp_path, "run", tmp_path / "run", small_corpus, f"tracking.uri={uri}",
                          "train.log_interval=1", "tracking.close_timeout_s=300",
                          **gated(tmp_path, "gate@6,gate@14"))
        trainer.wait_for(f"waits for {tmp_path}/gate-6")
    open_gate(tmp_path, "6")  # server stopped: steps 6-13 train without it
    trainer.wait_for(f"waits for {tmp_path}/gate-14")
    trainer.wait_for("unreachable")
    with mlflow_server(tmp_path, port):
        open_gate(tmp_path, "14")
        assert trainer.finish() == 0, trainer.text()[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("mtp-tiny").experiment_id])
        history = [m.step for m in client.get_metric_history(run.info.run_id, "loss_head1")]
    assert history == list(range(1, 21)) and run.info.status == "FINISHED"
    err = trainer.err.read_text()
    assert err.count("unreachable") == 1 and err.count("is back") == 1, err
    assert "Traceback" not in err


def test_a_resume_while_the_server_is_down_trains_and_catches_up_later(small_corpus, tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    with mlflow_server(tmp_path, port) as uri:
        first = Trainer(tmp_path, "first", run_dir, small_corpus, f"tracking.uri={uri}", "--stop-after", "10")
        assert first.finish() == 0, first.text()[-3000:]
    down = Trainer(tmp_path, "down", run_dir, small_corpus, f"tracking.uri={uri}", "tracking.close_timeout_s=5")
    assert down.finish() == 0, down.text()[-3000:]  # training decides the exit, not the tracker
    assert "did not take the end of run" in down.err.read_text() and "Traceback" not in down.err.read_text()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 21))
    with mlflow_server(tmp_path, port):
        again = Trainer(tmp_path, "again", run_dir, small_corpus, f"tracking.uri={uri}")  # finished: it only syncs
        assert again.finish() == 0, again.text()[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("mtp-tiny").experiment_id])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_head1")) == list(range(1, 21))
        assert run.info.status == "FINISHED"


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs: a real file system that really fills up."""
    with small_tmpfs(tmp_path, 64 << 20) as mount:
        yield mount


def test_a_full_disk_under_the_logs_is_one_line_and_loses_nothing(small_corpus, small_disk, tmp_path, full_run):
    run_dir = small_disk / "run"
    args = ("tracking.enabled=false", f"checkpoint.dir={tmp_path / 'ckpt'}", "data.log_sample_ids=true")
    trainer = Trainer(tmp_path, "full", run_dir, small_corpus, *args, **gated(tmp_path, "gate@8"))
    trainer.wait_for("waits for")
    kept = (run_dir / "metrics.jsonl").read_text()
    ballast = fill(small_disk)
    open_gate(tmp_path, "8")
    assert trainer.finish() == 1
    (line,) = trainer.our_lines()
    # Logs are written at each flush (train.log_interval, checkpoints): the first write after the gate fails.
    failed = re.match(r"mtp train: failed: step (\d+): No space left on device writing ", line)
    assert failed and int(failed[1]) >= 8 and ("samples/dp" in line or "metrics.jsonl" in line), line
    assert "Traceback" not in trainer.err.read_text()
    assert (run_dir / "metrics.jsonl").read_text().startswith(kept)
    ballast.unlink()
    again = Trainer(tmp_path, "again", run_dir, small_corpus, *args)
    assert again.finish() == 0, again.text()[-3000:]
    assert head_losses(metrics(run_dir), 4) == pytest.approx(head_losses(metrics(full_run), 4), rel=1e-6)

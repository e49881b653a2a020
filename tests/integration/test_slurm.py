"""SLURM submission on a real one-node cluster (munged + slurmctld + slurmd on loopback).

Jobs go through the real `sbatch`, and run `srun` -> `torchrun` (2 gloo
processes, dp=2) -> `mtp train` as on a production cluster; slurm_cluster.py
lists the few cluster settings that differ and why.
"""

import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.manifest import load_manifest
from tests.integration import slurm_cluster
from tests.integration.conftest import REPO, mtp_env, run_mtp
from tests.integration.slurm_cluster import ClusterError, SlurmCluster, missing_tools
from tests.integration.test_train import TINY, metrics

JOB_TIMEOUT = 420  # seconds one training job may take, requeue included, before the test fails


def _require_cluster_tools() -> None:
    """Skip on a developer machine without SLURM; in CI (CI=true) fail instead, never skip."""
    problem = None
    if missing_tools():
        problem = f"SLURM tools missing: {', '.join(missing_tools())}; run `make system-deps` (as root)"
    elif os.geteuid() != 0:
        problem = "the test SLURM cluster runs slurmd, which needs root"
    if problem and os.environ.get("CI") == "true":
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def cluster():
    _require_cluster_tools()
    started = SlurmCluster.start()
    yield started
    started.stop()


def submit(cluster: SlurmCluster, run_dir: Path, data: Path, *extra: str, check: bool = True, **env: str):
    """`mtp submit` of the tiny config as 2 processes on the one node (`env`: more for the job's environment)."""
    return run_mtp("submit", "--config", "configs/tiny-cpu.yaml", "--nodes", "1", "--nproc-per-node", "2",
                   *TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra,
                   env=mtp_env(SLURM_CONF=str(cluster.conf), **env), check=check)


def job_id(submitted) -> int:
    return int(re.search(r"submitted job (\d+)", submitted.stdout).group(1))


def job_log(run_dir: Path, job: int) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log yet)"


def shown(run_dir: Path, job: int, lines: int = 60) -> str:
    """The end of the job's log, for assertion messages."""
    return "\n".join(job_log(run_dir, job).splitlines()[-lines:])


def finish(cluster: SlurmCluster, run_dir: Path, job: int) -> dict[str, str]:
    """Wait for the job to end and require that it completed, showing its log if not."""
    info = cluster.wait_job(job, timeout=JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED", f"{info}\n{shown(run_dir, job)}"
    return info


def wait_until(cluster: SlurmCluster, run_dir: Path, job: int, what: str, ready) -> None:
    """Poll `ready` while the job runs; fail at once, with its log, if the job ends first."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ready():
        state = cluster.job(job).get("JobState")
        if state in slurm_cluster.FINAL_STATES or time.monotonic() > deadline:
            raise AssertionError(f"job {job} is {state} before {what}\n{shown(run_dir, job)}")
        time.sleep(0.2)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def flat_head_losses(run_dir: Path) -> list[float]:
    """Every head's loss at every step, in one flat list (pytest.approx compares flat lists)."""
    return [row[f"loss_head{k}"] for row in metrics(run_dir) for k in range(1, 5)]


def mlflow_runs(run_dir: Path) -> list:
    """Every run in the run dir's default SQLite store, whatever its experiment."""
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def reference(cluster, small_corpus, tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted 20-step run submitted with `mtp submit`: 2 processes (dp=2) on the one node."""
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "reference"
    job = job_id(submit(cluster, run_dir, small_corpus))
    finish(cluster, run_dir, job)
    return run_dir, job


def test_cluster_runs_a_batch_job(cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = int(cluster.run("sbatch", "--parsable", f"--output={out}", "--wrap",
                          "srun hostname && echo job $SLURM_JOB_ID done").stdout.split(";")[0])
    info = cluster.wait_job(job, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert f"job {job} done" in out.read_text()


def test_submitted_training_completes_with_metrics_checkpoint_and_mlflow(reference):
    run_dir, job = reference
    log = job_log(run_dir, job)
    assert "x 2 process(es)" in log and "resumed from" not in log
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert (run_dir / "checkpoints" / "step_000020" / "COMPLETE").is_file()
    assert (run_dir / "slurm" / "train.sbatch").read_text() == (REPO / "slurm" / "train.sbatch").read_text()
    (run,) = mlflow_runs(run_dir)
    assert run.info.status == "FINISHED" and "loss_head4" in run.data.metrics


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted_run(cluster, reference, small_corpus,
                                                                         tmp_path):
    """Every rank is held at a gate before step 3, so USR1 lands mid-run however loaded the box is (the stop
    opens the gate); the file is made once the stop is handled, for the requeued attempt meets the gate again."""
    run_dir, gate = tmp_path / "preempted", tmp_path / "gate"
    job = job_id(submit(cluster, run_dir, small_corpus, MTP_FAULT="gate@3", MTP_FAULT_GATE=str(gate)))
    wait_until(cluster, run_dir, job, "its workers wait before step 3", lambda: "waits for" in job_log(run_dir, job))
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    wait_until(cluster, run_dir, job, "the stop is handled", lambda: "stop signal received" in job_log(run_dir, job))
    gate.touch()
    info = finish(cluster, run_dir, job)
    log = job_log(run_dir, job)
    assert info["Restarts"] == "1", shown(run_dir, job)
    stopped = re.search(r"stop signal received: checkpointed step (\d+)", log)
    assert stopped and int(stopped.group(1)) == 3, shown(run_dir, job)  # the step the gate held
    assert f"requeued job {job}" in log and f"resumed from {run_dir}/checkpoints/step_" in log
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert flat_head_losses(run_dir) == pytest.approx(flat_head_losses(reference[0]), rel=1e-6)
    (run,) = mlflow_runs(run_dir)  # both attempts log into one run
    assert run.info.status == "FINISHED"


def worker_pid(job: int, local_rank: int) -> int | None:
    """The first attempt's `mtp train` process of this job with this LOCAL_RANK (torchrun sets it)."""
    wanted = {f"SLURM_JOB_ID={job}".encode(), f"LOCAL_RANK={local_rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0")) if entry.name.isdigit() else set()
        except OSError:
            continue
        if wanted <= env:
            return int(entry.name)
    return None


def test_torchrun_restarts_a_killed_worker_and_resumes_exactly(cluster, reference, small_corpus, tmp_path):
    """Rank 1 is held at a gate before step 7 (a gate strikes the first attempt only, so nothing holds the
    restarted group) and killed there: the kill lands after the step-5 checkpoint however loaded the box is."""
    run_dir = tmp_path / "worker-killed"
    job = job_id(submit(cluster, run_dir, small_corpus, MTP_FAULT="gate@7:1", MTP_FAULT_GATE=str(tmp_path / "gate")))
    held = "rank 1 before step 7 waits for"
    wait_until(cluster, run_dir, job, "rank 1 waits before step 7", lambda: held in job_log(run_dir, job))
    victim = worker_pid(job, local_rank=1)
    assert victim, f"no training process with LOCAL_RANK=1 in job {job}\n{shown(run_dir, job)}"
    os.kill(victim, signal.SIGKILL)
    info = finish(cluster, run_dir, job)
    log = job_log(run_dir, job)
    assert info["Restarts"] == "0", "torchrun, not SLURM, must handle a worker failure"
    assert "failed (exitcode: -9) local_rank: 1" in log, shown(run_dir, job)
    assert f"resumed from {run_dir}/checkpoints/step_" in log, shown(run_dir, job)
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert flat_head_losses(run_dir) == pytest.approx(flat_head_losses(reference[0]), rel=1e-6)


def test_stop_after_training_finished_does_not_requeue(cluster, reference, small_corpus, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(reference[0], run_dir)
    job = job_id(submit(cluster, run_dir, small_corpus, "tracking.enabled=false"))
    started = f"job {job} attempt 1"  # printed after the batch shell set its traps
    wait_until(cluster, run_dir, job, "its batch script started", lambda: started in job_log(run_dir, job))
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = finish(cluster, run_dir, job)
    log = job_log(run_dir, job)
    assert info["Restarts"] == "0", shown(run_dir, job)
    assert "training finished before the stop; not requeueing" in log, shown(run_dir, job)


def test_a_stop_before_training_is_ready_is_held_then_delivered(cluster, reference, small_corpus, tmp_path):
    """USR1 while every worker waits before installing its handlers: the batch shell holds it, training
    picks it up when ready, stops with nothing to save, the job requeues and finishes as the reference."""
    run_dir, gate = tmp_path / "held", tmp_path / "gate"
    job = job_id(submit(cluster, run_dir, small_corpus, MTP_FAULT="gate@launch", MTP_FAULT_GATE=str(gate)))
    wait_until(cluster, run_dir, job, "its workers wait at the gate", lambda: "waits for" in job_log(run_dir, job))
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    wait_until(cluster, run_dir, job, "the stop is held", lambda: "holding the stop" in job_log(run_dir, job))
    gate.touch()
    info = finish(cluster, run_dir, job)
    log = job_log(run_dir, job)
    assert info["Restarts"] == "1", shown(run_dir, job)
    assert "stop signal received during start-up: nothing to checkpoint yet" in log, shown(run_dir, job)
    assert "exited with status 0" in log and f"requeued job {job}" in log, shown(run_dir, job)
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert flat_head_losses(run_dir) == pytest.approx(flat_head_losses(reference[0]), rel=1e-6)


def test_dry_run_writes_script_and_command_without_submitting(cluster, small_corpus, tmp_path):
    run_dir = tmp_path / "dry"
    out = submit(cluster, run_dir, small_corpus, "--dry-run")
    script, submit_sh = run_dir / "slurm" / "train.sbatch", run_dir / "slurm" / "submit.sh"
    assert script.read_text() == (REPO / "slurm" / "train.sbatch").read_text()
    command = shlex.split(submit_sh.read_text().splitlines()[-1])[1:]  # after `exec`
    assert f"command: {shlex.join(command)}" in out.stdout and "submitted job" not in out.stdout
    assert "JobName=mtp-dry" not in cluster.run("scontrol", "show", "jobs", "-o").stdout
    assert command[:2] == ["sbatch", "--parsable"] and str(script) in command
    cluster.run(command[0], "--test-only", *command[1:])  # the real sbatch accepts exactly this command


def test_sbatch_accepts_a_container_submission(cluster, small_corpus, tmp_path):
    """The container settings ride in --export; the real sbatch must take them as they are."""
    run_dir = tmp_path / "boxed"
    submit(cluster, run_dir, small_corpus, "--dry-run", "--container-image", "nvcr.io#me/mtp:gpu",
           "--container-mount", str(small_corpus), "--container-mount", f"{tmp_path}:/scratch")
    command = shlex.split((run_dir / "slurm" / "submit.sh").read_text().splitlines()[-1])[1:]
    export = next(arg for arg in command if arg.startswith("--export="))
    assert "MTP_CONTAINER_IMAGE=nvcr.io#me/mtp:gpu" in export and "MTP_PYTHON=python3" in export
    assert f"MTP_CONTAINER_MOUNTS={small_corpus}:{small_corpus};{tmp_path}:/scratch" in export
    cluster.run(command[0], "--test-only", *command[1:])


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--config", "configs/nope.yaml"], {}, "config file configs/nope.yaml not found"),
        (["--config", "configs/tiny-cpu.yaml", "--partition", "nope"], {}, "sbatch failed:"),
        (["--config", "configs/tiny-cpu.yaml"], {"PATH": "/nonexistent"}, "sbatch not found on PATH"),
    ],
)
def test_submit_errors_are_one_line(args, env, needle, cluster, small_corpus, tmp_path):
    base = mtp_env(SLURM_CONF=str(cluster.conf))
    out = run_mtp("submit", *args, "--nodes", "1", *TINY, f"data.dir={small_corpus}", f"run.dir={tmp_path}",
                  env={**base, **env}, check=False)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_daemon_that_fails_to_start_shows_its_log(monkeypatch):
    _require_cluster_tools()
    real_conf = slurm_cluster.slurm_conf
    monkeypatch.setattr(slurm_cluster, "slurm_conf", lambda *args: real_conf(*args) + "NoSuchOption=1\n")
    with pytest.raises(ClusterError) as failure:
        SlurmCluster.start(timeout=60)
    assert "slurmctld exited" in str(failure.value)
    assert "NoSuchOption" in str(failure.value), "the error must carry the daemon's log tail"


def test_prepare_array_job_of_three_tasks_equals_one_prepare(cluster, tmp_path):
    """slurm/prepare.sbatch as an array of 3 tasks: parts in one --out, merged by the last task."""
    from tests.integration.test_data_cli import _prepare_args, _shard_documents

    whole, out = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_mtp(*_prepare_args(whole))
    submitted = cluster.run("sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/prepare-%A_%a.out",
                            f"--chdir={REPO}", f"--export=ALL,MTP_PYTHON={sys.executable}",
                            str(REPO / "slurm" / "prepare.sbatch"), *_prepare_args(out)[1:])
    job = int(submitted.stdout.strip().split(";")[0])
    states = wait_array(cluster, job, tasks=3)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("prepare-*.out")))
    assert states == ["COMPLETED"] * 3, logs
    assert [f"part {i}/3" in logs for i in range(3)] == [True] * 3, logs
    assert "all parts done, manifest written" in logs, logs
    assert _shard_documents(out) == _shard_documents(whole)
    assert load_manifest(out).parts == 3


def wait_array(cluster: SlurmCluster, job: int, tasks: int, timeout: float = JOB_TIMEOUT) -> list[str]:
    """The final JobState of every task of array job `job`, once all have one."""
    deadline = time.monotonic() + timeout
    while True:
        lines = cluster.run("scontrol", "show", "job", "-o", str(job)).stdout.splitlines()
        states = [dict(re.findall(r"(\w+)=(\S*)", line)).get("JobState") for line in lines if line.strip()]
        if len(states) == tasks and all(s in slurm_cluster.FINAL_STATES for s in states):
            return states
        if time.monotonic() > deadline:
            raise ClusterError(f"array job {job} not finished after {timeout:.0f}s: {states}\n" + cluster.log_tails())
        time.sleep(1.0)

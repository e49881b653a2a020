"""Fault tolerance of real training: faults injected into `mtp train` under torchrun.

The drills are those of `mtp bench faults` (which writes docs/reliability.md):
a hung rank, a kill during a checkpoint write, NaN steps skipped and NaN
steps that exhaust `fault.max_skipped_steps`, the tracking server down for
part of a two-process run. A worker killed by SIGKILL and
a preemption are drilled on the real SLURM cluster in test_slurm.py.
"""

import json

import pytest

from pretrain.bench.faults import same_state
from tests.integration.conftest import mtp_env, run_mtp
from tests.integration.test_train import metrics

DRILLS = "rank-hung,killed-while-saving,nan-skipped,nan-diverged,tracking-down"


@pytest.fixture(scope="module")
def drills(small_corpus, tmp_path_factory) -> dict[str, dict]:
    workdir = tmp_path_factory.mktemp("drills")
    proc = run_mtp("bench", "faults", "--data", str(small_corpus), "--drills", DRILLS, "--workdir", str(workdir),
                   "--json", timeout=900, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return {r["drill"]: {**r, "dir": workdir / r["drill"]} for r in json.loads(proc.stdout)}


def assert_recovered_exactly(result: dict) -> None:
    assert result["exit_code"] == 0, result
    assert result["samples_lost"] == 0 and result["samples_repeated"] == 0, result
    assert result["losses_equal"] is True, result


def test_hung_rank_times_out_with_a_clear_error_and_torchrun_restarts_it(drills):
    result = drills["rank-hung"]
    assert_recovered_exactly(result)
    assert "a collective did not finish within fault.collective_timeout_s=10s" in result["note"], result
    assert result["resumed_at"] == 4 and result["steps_lost"] == 2, result  # step 7 hung; 5 and 6 redone


def test_kill_during_checkpoint_write_resumes_from_the_previous_checkpoint(drills):
    result = drills["killed-while-saving"]
    assert_recovered_exactly(result)
    assert result["resumed_at"] == 4, result  # the half-written step-8 checkpoint is never chosen
    assert not list((result["dir"] / "checkpoints").glob(".tmp-*")), "the killed writer's temp dir is cleaned up"


def test_nan_steps_are_skipped_without_touching_weights_or_optimizer(drills):
    result = drills["nan-skipped"]
    assert result["exit_code"] == 0 and result["state_kept"] is True, result
    rows = metrics(result["dir"])
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert [row["skipped_steps"] for row in rows if row["step"] in (4, 8, 12)] == [0, 4, 4]
    assert all(row["loss"] == row["loss"] for row in rows if row["step"] > 8)  # finite again after the skips


def test_too_many_nan_steps_stop_the_run_naming_the_step(drills):
    result = drills["nan-diverged"]
    assert result["exit_code"] == 1, result
    assert "step 7:" in result["note"] and "fault.max_skipped_steps=2" in result["note"], result


def test_a_tracking_outage_neither_restarts_nor_loses_a_step(drills):
    """Rank 0 drains MLflow's backlog at the end while rank 1 is done: no collective waits on the tracker."""
    result = drills["tracking-down"]
    assert_recovered_exactly(result)
    assert result["resumed_at"] is None, "the group was restarted: " + result["note"]
    assert result["note"].startswith("MLflow complete: 12 of 12 steps once each in the run, status FINISHED"), result
    assert "warned 1x unreachable, 1x back" in result["note"], result


def test_zero_stage_0_skips_nan_steps_exactly(small_corpus, tmp_path):
    """Our own gradient clipping (ZeRO-0, float32) drops a NaN step like DeepSpeed's ZeRO optimizers do."""
    run_dir = tmp_path / "nan-zero0"
    env = mtp_env(MTP_FAULT="nan@3-4")
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", "model.d_model=64", "model.n_layers=3", "model.n_heads=4",
            "model.max_seq_len=64", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.max_steps=6", "train.eval_interval=0", "schedule.warmup_steps=2", "checkpoint.interval=2", "checkpoint.keep=5",
            "tracking.enabled=false", "parallel.zero_stage=0", f"data.dir={small_corpus}", f"run.dir={run_dir}",
            env=env)
    checkpoints = run_dir / "checkpoints"
    assert same_state(checkpoints, 2, 4)
    assert not same_state(checkpoints, 4, 6)  # training goes on after the skips


def test_a_malformed_fault_spec_is_one_line(small_corpus, tmp_path):
    proc = run_mtp("train", "--config", "configs/tiny-cpu.yaml", f"data.dir={small_corpus}",
                   f"run.dir={tmp_path / 'r'}", env=mtp_env(MTP_FAULT="explode@3"), check=False)
    assert proc.returncode == 2
    assert "MTP_FAULT='explode@3' is not KIND@STEP" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_drill_is_refused(small_corpus):
    proc = run_mtp("bench", "faults", "--data", str(small_corpus), "--drills", "meteor", check=False)
    assert proc.returncode == 2 and "unknown drill(s) meteor" in proc.stderr


def test_drills_need_prepared_data(tmp_path):
    proc = run_mtp("bench", "faults", "--data", str(tmp_path), check=False)
    assert proc.returncode == 2 and "holds no prepared data" in proc.stderr

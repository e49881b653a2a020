"""`mtp eval` end to end on a tiny trained model: the real commands, real MLflow, the real sandbox."""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.conftest import MTP, REPO, mtp_env, run_mtp

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=128", "model.n_future=3",
    "model.loss_chunk_tokens=48", "train.seq_len=48", "train.global_batch_size=4", "train.micro_batch_size=4",
    "train.max_steps=4", "train.eval_interval=100", "train.log_interval=2", "checkpoint.interval=2",
    "schedule.warmup_steps=1", "optimizer.lr=3e-3",
]
QUICK = ["--max-new-tokens", "24", "--timeout", "30"]


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory) -> Path:
    """A 4-step n=3 run that evaluated loss and acceptance during training at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("runs") / "eval"
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}", f"run.dir={run_dir}",
            "eval.suites=[loss, acceptance]", "eval.interval=2", "eval.loss_windows=8")
    return run_dir


def training_run(run_dir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client, (run_dir / "mlflow_run_id").read_text().strip()


def test_training_evaluated_every_interval_into_its_own_mlflow_run(trained):
    for step in (2, 4):
        summary = json.loads((trained / "eval" / f"step_{step:06d}" / "summary.json").read_text())
        assert summary["step"] == step and set(summary["loss"]["nats_per_token"]) == {"1", "2", "3"}
    client, run_id = training_run(trained)
    history = client.get_metric_history(run_id, "eval.loss.head1")
    assert sorted(m.step for m in history) == [2, 4] and all(math.isfinite(m.value) for m in history)
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval.tokens_per_forward.k3")) == [2, 4]
    assert client.get_run(run_id).info.status == "FINISHED"  # the evaluation left the run's status alone


def test_loss_and_acceptance_give_finite_per_head_figures(trained, small_corpus, tmp_path):
    out = run_mtp("eval", "--model", str(trained), "--suite", "loss,acceptance", "--data", str(small_corpus),
                  "--out", str(tmp_path / "e"), "--windows", "4", "--positions", "8", "--json", "--no-tracking")
    results = json.loads(out.stdout)
    loss, acceptance = results["loss"], results["acceptance"]
    assert loss["windows"] == loss["split_windows"] > 0  # the whole val split, once
    for k in ("1", "2", "3"):
        assert math.isfinite(loss["nats_per_token"][k]) and loss["nats_per_token"][k] > 0
        assert loss["bits_per_byte"][k] == pytest.approx(loss["nats_per_token"][k] / math.log(2) / loss["bytes_per_token"])
    assert acceptance["positions"] == 32 and sum(acceptance["accepted_histogram"]) == 32
    tpf = acceptance["expected_tokens_per_forward"]
    assert tpf["1"] == 1.0 and 1.0 <= tpf["2"] <= tpf["3"] <= 3.0
    assert (tmp_path / "e" / "summary.md").read_text().startswith("| head | loss (nats/token)")


def test_an_exported_file_is_evaluated_into_a_new_mlflow_run(trained, tmp_path):
    model = tmp_path / "model.safetensors"
    run_mtp("export", "--checkpoint", str(trained), "--out", str(model))
    out_dir = tmp_path / "file-eval"
    run_mtp("eval", "--model", str(model), "--suite", "acceptance", "--windows", "2", "--positions", "4",
            "--out", str(out_dir))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["acceptance"]["window_tokens"] == 48  # train.seq_len, from the file
    assert summary["acceptance"]["text"] == "the held-out stdlib files"  # no --data: the stdlib's held-out split
    client = MlflowClient(tracking_uri=summary["mlflow"]["uri"])
    assert summary["mlflow"]["uri"] == f"sqlite:///{out_dir.resolve() / 'mlflow.db'}"
    history = client.get_metric_history(summary["mlflow"]["run_id"], "eval.tokens_per_forward.k3")
    assert [m.step for m in history] == [4] and 1.0 <= history[0].value <= 3.0
    assert client.get_experiment_by_name("mtp-eval") is not None


def test_humaneval_on_three_problems_writes_every_output(trained, tmp_path):
    out_dir = tmp_path / "he"
    proc = run_mtp("eval", "--model", str(trained / "checkpoints"), "--suite", "humaneval", "--limit", "3",
                   "--samples", "2", "--out", str(out_dir), *QUICK)
    rows = [json.loads(line) for line in (out_dir / "humaneval.jsonl").read_text().splitlines()]
    assert sorted((r["task_id"], r["sample"]) for r in rows) == [(f"HumanEval/{i}", s) for i in range(3) for s in (0, 1)]
    assert all(set(r) >= {"completion", "passed", "kind", "detail"} for r in rows)
    summary = json.loads((out_dir / "summary.json").read_text())["humaneval"]
    assert summary["problems"] == 3 and summary["samples_scored"] == 6 and 0.0 <= summary["pass@1"] <= 1.0
    assert summary["temperature"] == 0.8 and "pass@10" not in summary
    assert "humaneval: 3/3 problems" in proc.stderr and "ETA" in proc.stderr
    assert "pass@1" in (out_dir / "summary.md").read_text()
    client, run_id = training_run(trained)
    assert [m.step for m in client.get_metric_history(run_id, "eval.humaneval.pass_at_1")] == [4]


def stalling_bwrap(bin_dir: Path, runs: int) -> Path:
    """A `bwrap` first on PATH that starts the real one `runs` times, then holds every later program back.

    The sandbox resolves bwrap on PATH once; the evaluator's own start-up check is its first run. A held
    program waits, without starting, until the evaluator that spawned it is gone, so the kill below lands
    after exactly `runs - 1` scored samples however fast or slow the machine is, and leaves nothing behind.
    """
    real, slots = shutil.which("bwrap"), bin_dir / "slots"
    slots.mkdir(parents=True)
    wrapper = bin_dir / "bwrap"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"n=1; while ! mkdir '{slots}'/$n 2>/dev/null; do n=$((n+1)); done\n"
        f'if [ "$n" -gt {runs} ]; then while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done; exit 1; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


def test_a_killed_evaluation_resumes_without_redoing_finished_samples(trained, tmp_path):
    out_dir = tmp_path / "resume"
    args = ["eval", "--model", str(trained), "--suite", "humaneval", "--limit", "3", "--samples", "2",
            "--batch-size", "1", "--workers", "1", "--out", str(out_dir), "--no-tracking", *QUICK]
    results = out_dir / "humaneval.jsonl"
    stall = stalling_bwrap(tmp_path / "bin", runs=3)  # the start-up check, then two samples
    env = mtp_env(PATH=f"{stall}{os.pathsep}{os.environ['PATH']}")
    first = subprocess.Popen([*MTP, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (results.is_file() and len(results.read_text().splitlines()) >= 2):
        assert first.poll() is None, f"the evaluation exited {first.returncode} before two samples were scored"
        assert time.monotonic() < deadline, "two samples were not scored within 10 minutes"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = results.read_text().splitlines()
    assert len(before) == 2, "the held sandbox let a third sample through"
    again = run_mtp(*args)
    after = results.read_text().splitlines()
    assert after[:2] == before and len(after) == 6  # finished samples kept, none scored twice
    assert "resuming, 2 of 6 samples already scored" in again.stderr
    summary = json.loads((out_dir / "summary.json").read_text())["humaneval"]
    assert summary["this_invocation"]["samples"] == 4 and summary["samples_scored"] == 6


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--suite", "loss,bleu"], "--suite loss,bleu: choose from loss, acceptance, humaneval"),
        (["--suite", "humaneval", "--samples", "3", "--temperature", "0"], "identical greedy completions"),
        (["--suite", "humaneval", "--speculative", "7"], "this model has 3 heads"),
        (["--suite", "loss", "--data", "/nonexistent"], "--data /nonexistent has no manifest.json"),
        (["--suite", "humaneval", "--problems", "/nonexistent.jsonl"], "--problems /nonexistent.jsonl not found"),
    ],
)
def test_bad_inputs_are_one_clear_line(trained, tmp_path, args, needle):
    out = run_mtp("eval", "--model", str(trained), "--out", str(tmp_path / "x"), "--no-tracking", *args, check=False)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_without_bubblewrap_the_error_names_the_fix(trained, tmp_path):
    env = mtp_env(PATH=str(tmp_path))  # no bwrap on this PATH
    out = run_mtp("eval", "--model", str(trained), "--suite", "humaneval", "--out", str(tmp_path / "x"), env=env,
                  check=False)
    assert out.returncode == 2 and "bubblewrap (bwrap)" in out.stderr and "make system-deps" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_another_setting_into_the_same_directory_is_refused(trained, tmp_path):
    out_dir = tmp_path / "same"
    base = ["eval", "--model", str(trained), "--suite", "humaneval", "--limit", "1", "--out", str(out_dir),
            "--no-tracking", *QUICK]
    run_mtp(*base)
    first = (out_dir / "humaneval.jsonl").read_text()
    out = run_mtp(*base, "--samples", "2", check=False)
    assert out.returncode == 2 and "other settings (samples, temperature differ)" in out.stderr
    assert (out_dir / "humaneval.jsonl").read_text() == first

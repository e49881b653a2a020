"""`mtp train` end to end on CPU: resume exactness, signals, fallback, MLflow, export.

Each run is a real `mtp train` process on a tiny model over real stdlib code.
"""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.local_mlflow import free_port, serve
from tests.integration.conftest import MTP, REPO, mtp_env, run_mtp

TINY = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.max_steps=20", "train.eval_interval=10", "train.eval_steps=2", "train.log_interval=5",
    "checkpoint.interval=5", "checkpoint.keep=3", "schedule.warmup_steps=2", "optimizer.lr=3e-3",
]
EXPERIMENT = "mtp-tiny"  # tracking.experiment of configs/tiny-cpu.yaml


def train(run_dir: Path, data: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={data}", f"run.dir={run_dir}",
                   *extra, check=check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def head_losses(rows: list[dict], n: int) -> list[float]:
    """Every head's loss of every step, flattened step-major."""
    return [row[f"loss_head{k}"] for row in rows for k in range(1, n + 1)]


@pytest.fixture(scope="module")
def full_run(small_corpus, tmp_path_factory) -> Path:
    """20 uninterrupted steps of an n=4 model: the reference the other runs are held to."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    train(run_dir, small_corpus)
    return run_dir


def test_every_head_learns_and_metrics_are_complete(full_run):
    rows = metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for k in range(1, 5):
        first = sum(row[f"loss_head{k}"] for row in rows[:3]) / 3
        last = sum(row[f"loss_head{k}"] for row in rows[-3:]) / 3
        assert last < first - 0.5, f"head {k} did not learn: {first:.3f} -> {last:.3f}"
    assert all(r["tokens"] == r["step"] * 8 * 32 for r in rows)
    assert {"lr", "grad_norm", "tokens_per_s", "val_loss_head4"} <= set(rows[-1])
    assert (full_run / "config.yaml").is_file() and (full_run / "head_losses.png").is_file()


def test_resume_equals_uninterrupted_run(full_run, small_corpus, tmp_path):
    run_dir = tmp_path / "resumed"
    first = train(run_dir, small_corpus, "--stop-after", "10")
    assert "checkpoint" in first.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 11))
    second = train(run_dir, small_corpus)
    assert "resumed from" in second.stdout and "step_000010" in second.stdout
    assert head_losses(metrics(run_dir), 4) == pytest.approx(head_losses(metrics(full_run), 4), rel=1e-6)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1, "a resumed run must log into the run it started"
    history = client.get_metric_history(runs[0].info.run_id, "loss_head3")
    assert sorted(m.step for m in history) == list(range(1, 21))


def test_mlflow_sqlite_store_holds_params_and_every_head(full_run):
    client = MlflowClient(f"sqlite:///{full_run / 'mlflow.db'}")
    (run,) = client.search_runs(experiment_ids=[client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_future"] == "4"
    assert {f"loss_head{k}" for k in range(1, 5)} <= set(run.data.metrics)
    assert run.info.run_id == (full_run / "mlflow_run_id").read_text().strip()


def test_corrupt_newest_checkpoint_falls_back(full_run, small_corpus, tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(full_run, run_dir)
    newest = run_dir / "checkpoints" / "step_000020"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = train(run_dir, small_corpus)
    assert "step_000020" in out.stderr and "skipping checkpoint" in out.stderr
    assert "resumed from" in out.stdout and "step_000015" in out.stdout
    assert head_losses(metrics(run_dir), 4) == pytest.approx(head_losses(metrics(full_run), 4), rel=1e-6)


def test_sigterm_checkpoints_and_exits_zero(small_corpus, tmp_path):
    run_dir = tmp_path / "signalled"
    cmd = [*MTP, "train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}",
           f"run.dir={run_dir}", "train.max_steps=100000", "checkpoint.interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=mtp_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    last = metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step_{last:06d}" / "COMPLETE").is_file()
    assert "stop signal received" in out


def test_next_token_baseline_trains(small_corpus, tmp_path):
    run_dir = tmp_path / "n1"
    train(run_dir, small_corpus, "model.n_future=1", "train.max_steps=10", "train.eval_interval=0")
    rows = metrics(run_dir)
    assert "loss_head2" not in rows[-1]
    assert rows[-1]["loss_head1"] < rows[0]["loss_head1"] - 0.5


NO_MLFLOW = """import sys


class NoMlflow:  # a machine without MLflow installed
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoMlflow())
"""


def test_without_mlflow_a_run_trains_untracked_and_a_tracked_one_is_one_line(small_corpus, tmp_path):
    """Only a process that tracks imports MLflow: a GPU node without it trains (and plots) with tracking off."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_MLFLOW)
    env = mtp_env(PYTHONPATH=str(tmp_path / "site"))
    untracked = tmp_path / "untracked"
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}", f"run.dir={untracked}",
            "train.max_steps=2", "train.eval_interval=0", "tracking.enabled=false", env=env)
    assert [row["step"] for row in metrics(untracked)] == [1, 2] and (untracked / "head_losses.png").is_file()
    tracked = run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}",
                      f"run.dir={tmp_path / 'tracked'}", "train.max_steps=2", "tracking.enabled=true", env=env,
                      check=False)
    assert tracked.returncode == 2, tracked.stderr[-3000:]
    assert "tracking.enabled=true but MLflow does not import here (No module named 'mlflow')" in tracked.stderr
    assert "Traceback" not in tracked.stderr


def test_export_round_trips_weights(full_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    run_mtp("export", "--checkpoint", str(full_run), "--out", str(out))
    weights = load_file(str(out))
    engine_file = full_run / "checkpoints" / "step_000020" / "engine" / "mp_rank_00_model_states.pt"
    saved = torch.load(engine_file, map_location="cpu", weights_only=False)["module"]
    saved = {k: v for k, v in saved.items() if torch.is_tensor(v)}
    assert set(weights) == set(saved)
    vocab = 258  # the byte tokenizer's; rows past it are padding no token ever reads, exported as zeros
    for name, tensor in saved.items():
        if name in ("embedding.embed.weight", "unembedding.output.weight"):
            assert torch.equal(weights[name][:vocab], tensor[:vocab]) and not weights[name][vocab:].any()
        else:
            assert torch.equal(weights[name], tensor.float()), name
    from pretrain.export import load_exported

    model, tokenizer, cfg = load_exported(str(out))
    assert cfg.n_future == 4 and tokenizer.decode(tokenizer.encode("def f(): pass")) == "def f(): pass"
    loaded = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    again = run_mtp("export", "--checkpoint", str(full_run), "--out", str(out), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_training_logs_to_a_real_mlflow_server(small_corpus, tmp_path):
    with serve(tmp_path / "server", free_port()) as server:
        train(tmp_path / "remote", small_corpus, f"tracking.uri={server.uri}", "train.max_steps=3",
              "train.eval_interval=0")
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert run.info.status == "FINISHED" and "loss_head4" in run.data.metrics


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_stepz=5", "train.max_steps"),
        ("train.max_steps=ten", "train.max_steps must be an integer"),
        ("train.global_batch_size=10", "train.global_batch_size"),
    ],
)
def test_bad_config_is_one_clear_line(override, needle, small_corpus, tmp_path):
    out = run_mtp("train", "--config", "configs/tiny-cpu.yaml", f"data.dir={small_corpus}",
                  f"run.dir={tmp_path}", override, check=False)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

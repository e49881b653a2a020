"""MLflow tracking against a real SQLite store and a real `mlflow server` on loopback."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import matplotlib.image
import pytest
from mlflow.tracking import MlflowClient

from pretrain.config import apply_overrides, config_to_dict, from_dict
from pretrain.errors import UserError
from pretrain.metrics import MetricsWriter, StepMetrics
from pretrain.tracking import NullTracker, Tracker, make_tracker, plot_head_curves, resolve_tracking_uri

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def head_metrics(step: int) -> dict[str, float]:
    return {"loss": 3.0 - step / 10, **{f"loss_head{k}": 2.0 + k - step / 10 for k in range(1, 5)}}


def test_run_in_sqlite_store_has_params_and_per_head_metrics(tmp_path):
    cfg = from_dict(apply_overrides({}, [f"run.dir={tmp_path}", "model.n_future=4"]))
    tracker = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None)
    tracker.log_params(config_to_dict(cfg))
    for step in (1, 2, 3):
        tracker.log_metrics(head_metrics(step), step)
    tracker.close()

    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["model.n_future"] == "4"
    assert run.data.params["optimizer.betas"] == "[0.9, 0.95]"
    history = client.get_metric_history(tracker.run_id, "loss_head3")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(5.0 - s / 10)) for s in (1, 2, 3)]
    assert set(run.data.metrics) == {"loss", "loss_head1", "loss_head2", "loss_head3", "loss_head4"}


def test_artifacts_of_sqlite_store_stay_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")
    config = tmp_path / "config.yaml"
    config.write_text("train: {}\n")
    tracker = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None)
    tracker.log_artifact(str(config))
    tracker.close()
    stored = list((tmp_path / "mlartifacts").rglob("config.yaml"))
    assert len(stored) == 1 and stored[0].read_text() == "train: {}\n"
    assert not Path("mlruns").exists()


def test_resume_logs_into_the_same_run(tmp_path, caplog):
    first = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None)
    first.log_params({"train.max_steps": 10, "model.n_future": 4})
    first.log_metrics(head_metrics(1), 1)
    first.close(status="KILLED")

    second = Tracker(sqlite_uri(tmp_path), "exp", "ignored", first.run_id)
    assert second.run_id == first.run_id
    client = MlflowClient(sqlite_uri(tmp_path))
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        second.log_params({"train.max_steps": 20, "model.n_future": 4, "data.seed": 5})
    assert "train.max_steps stays '10'" in caplog.text
    second.log_metrics(head_metrics(2), 2)
    second.close()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.max_steps": "10", "model.n_future": "4", "data.seed": "5"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss_head1")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resuming_an_unknown_run_is_a_user_error(tmp_path):
    Tracker(sqlite_uri(tmp_path), "exp", "run-a", None).close()
    with pytest.raises(UserError, match="MLflow run 0123abcd recorded in the checkpoint does not exist"):
        Tracker(sqlite_uri(tmp_path), "exp", "run-a", "0123abcd")


def test_metrics_are_buffered_until_flush(tmp_path):
    tracker = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None, flush_interval_s=3600)
    tracker.log_metrics({"loss": 1.0}, 1)
    client = MlflowClient(sqlite_uri(tmp_path))
    assert client.get_run(tracker.run_id).data.metrics == {}
    assert tracker.flush()
    assert client.get_run(tracker.run_id).data.metrics == {"loss": 1.0}
    tracker.close()


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = from_dict(apply_overrides({}, [f"run.dir={tmp_path / 'run'}"]))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:1"
    cfg.tracking.uri = "sqlite:////elsewhere/m.db"
    assert resolve_tracking_uri(cfg) == "sqlite:////elsewhere/m.db"


def test_make_tracker_is_a_no_op_off_rank_zero_or_when_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = from_dict(apply_overrides({}, [f"run.dir={tmp_path}"]))
    assert isinstance(make_tracker(cfg, rank=1), NullTracker)
    assert not (tmp_path / "mlflow.db").exists()
    cfg.tracking.enabled = False
    assert isinstance(make_tracker(cfg, rank=0), NullTracker)
    cfg.tracking.enabled = True
    tracker = make_tracker(cfg, rank=0)
    assert isinstance(tracker, Tracker) and (tmp_path / "mlflow.db").exists()
    tracker.close()
    assert MlflowClient(sqlite_uri(tmp_path)).get_run(tracker.run_id).info.run_name == tmp_path.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(tmp_path: Path, port: int):
    """A real `mlflow server` on loopback, ready when /health answers; always stopped."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / f"server-{port}.log", "a")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", sqlite_uri(tmp_path),
         "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", tmp_path / f"server-{port}.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not ready after {deadline_s}s:\n{log_path.read_text()[-3000:]}")


def test_real_server_receives_the_run(tmp_path):
    with mlflow_server(tmp_path, free_port()) as uri:
        tracker = Tracker(uri, "exp", "remote", None)
        tracker.log_params({"model.n_future": 4})
        tracker.log_metrics(head_metrics(1), 1)
        artifact = tmp_path / "config.yaml"
        artifact.write_text("model: {n_future: 4}\n")
        tracker.log_artifact(str(artifact))
        tracker.close()
        run = MlflowClient(uri).get_run(tracker.run_id)
        assert run.data.params == {"model.n_future": "4"}
        assert run.data.metrics["loss_head4"] == pytest.approx(5.9)
    # The server wrote to its own store: read it without the server.
    stored = MlflowClient(sqlite_uri(tmp_path)).get_run(tracker.run_id)
    assert stored.info.status == "FINISHED"
    assert list((tmp_path / "artifacts").rglob("config.yaml"))


def test_server_outage_keeps_metrics_for_the_next_flush(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    with mlflow_server(tmp_path, port) as uri:
        tracker = Tracker(uri, "exp", "remote", None, flush_interval_s=3600)
        tracker.log_metrics({"loss": 3.0}, 1)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        assert not tracker.flush()
    assert "1 metrics kept for the next flush" in caplog.text
    with mlflow_server(tmp_path, port):
        tracker.log_metrics({"loss": 2.0}, 2)
        tracker.close()
        history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]


def test_unreachable_server_at_start_is_a_user_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(UserError, match=r"MLflow tracking at http://127.0.0.1:\d+ failed: .*tracking.enabled=false"):
        Tracker(f"http://127.0.0.1:{free_port()}", "exp", "run", None)


def test_plot_head_curves(tmp_path):
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    for step in range(1, 30):
        heads = [2.0 + k * 0.2 + 1 / step for k in range(4)]
        writer.write(StepMetrics(step, step * 100, sum(heads), heads, 1e-3, 0.5, 1000.0))
    writer.close()
    out = tmp_path / "plots" / "heads.png"
    plot_head_curves(str(tmp_path / "metrics.jsonl"), str(out))
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_plot_without_head_losses_is_a_user_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UserError, match="no per-head losses"):
        plot_head_curves(str(path), str(tmp_path / "x.png"))


def test_null_tracker_accepts_everything():
    tracker = NullTracker()
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush() and tracker.run_id is None
    tracker.close()

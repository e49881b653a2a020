"""MLflow tracking against a real SQLite store and a real `mlflow server` on loopback."""

import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib.image
import pytest
from mlflow.tracking import MlflowClient

from pretrain.config import apply_overrides, config_to_dict, from_dict
from pretrain.errors import UserError
from pretrain.local_mlflow import free_port, serve
from pretrain.metrics import MetricsWriter, StepMetrics
from pretrain.tracking import NullTracker, make_tracker, plot_head_curves, resolve_tracking_uri
from pretrain.tracking_background import BackgroundTracker
from pretrain.tracking_mlflow import Tracker


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def head_metrics(step: int) -> dict[str, float]:
    return {"loss": 3.0 - step / 10, **{f"loss_head{k}": 2.0 + k - step / 10 for k in range(1, 5)}}


def rows(*steps: int) -> list[dict]:
    return [{"step": s, **head_metrics(s)} for s in steps]


def test_run_in_sqlite_store_has_params_and_per_head_metrics(tmp_path):
    cfg = from_dict(apply_overrides({}, [f"run.dir={tmp_path}", "model.n_future=4"]))
    tracker = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None)
    tracker.log_params(config_to_dict(cfg))
    tracker.send(rows(1, 2, 3))
    tracker.terminate("FINISHED")

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
    tracker.terminate("FINISHED")
    stored = list((tmp_path / "mlartifacts").rglob("config.yaml"))
    assert len(stored) == 1 and stored[0].read_text() == "train: {}\n"
    assert not Path("mlruns").exists()


def test_resume_logs_into_the_same_run(tmp_path, caplog):
    first = Tracker(sqlite_uri(tmp_path), "exp", "run-a", None)
    first.log_params({"train.max_steps": 10, "model.n_future": 4})
    first.send(rows(1))
    first.terminate("KILLED")

    second = Tracker(sqlite_uri(tmp_path), "exp", "ignored", first.run_id)
    assert second.run_id == first.run_id
    client = MlflowClient(sqlite_uri(tmp_path))
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        second.log_params({"train.max_steps": 20, "model.n_future": 4, "data.seed": 5})
    assert "train.max_steps stays '10'" in caplog.text
    second.send(rows(2))
    second.terminate("FINISHED")

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.max_steps": "10", "model.n_future": "4", "data.seed": "5"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss_head1")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resuming_an_unknown_run_is_a_user_error(tmp_path):
    Tracker(sqlite_uri(tmp_path), "exp", "run-a", None).terminate("FINISHED")
    with pytest.raises(UserError, match="MLflow run 0123abcd recorded in the checkpoint does not exist"):
        Tracker(sqlite_uri(tmp_path), "exp", "run-a", "0123abcd")


def feed(tracker: BackgroundTracker, writer: MetricsWriter, steps) -> None:
    """What RunOutputs does per step: metrics.jsonl first, then the queue."""
    for row in rows(*steps):
        writer.write_row(row)
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])


def wait_for(what: str, ready, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged_steps(uri: str, run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss_head1")]


def test_background_tracker_sends_queued_steps_and_the_final_status(tmp_path):
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    tracker = BackgroundTracker(Tracker(sqlite_uri(tmp_path), "exp", "run-a", None), tmp_path, None, 60)
    feed(tracker, writer, range(1, 8))
    assert tracker.close("FINISHED") is None
    assert logged_steps(sqlite_uri(tmp_path), tracker.run_id) == list(range(1, 8))
    assert MlflowClient(sqlite_uri(tmp_path)).get_run(tracker.run_id).info.status == "FINISHED"
    assert (tmp_path / "mlflow_sent_step").read_text().split() == [tracker.run_id, "7"]
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
    assert isinstance(tracker, BackgroundTracker) and (tmp_path / "mlflow.db").exists()
    assert tracker.close() is None
    assert MlflowClient(sqlite_uri(tmp_path)).get_run(tracker.run_id).info.run_name == tmp_path.name


@contextmanager
def mlflow_server(tmp_path: Path, port: int):
    """A real `mlflow server` on loopback (pretrain/local_mlflow.py), its store in tmp_path."""
    with serve(tmp_path, port) as server:
        (tmp_path / "server.pid").write_text(str(server.pid))
        yield server.uri


def server_pid(tmp_path: Path) -> int:
    """The process group of the newest `mlflow_server` started in tmp_path (it leads its own session)."""
    return int((tmp_path / "server.pid").read_text())


def test_real_server_receives_the_run(tmp_path):
    with mlflow_server(tmp_path, free_port()) as uri:
        tracker = Tracker(uri, "exp", "remote", None)
        tracker.log_params({"model.n_future": 4})
        tracker.send(rows(1))
        artifact = tmp_path / "config.yaml"
        artifact.write_text("model: {n_future: 4}\n")
        tracker.log_artifact(str(artifact))
        tracker.terminate("FINISHED")
        run = MlflowClient(uri).get_run(tracker.run_id)
        assert run.data.params == {"model.n_future": "4"}
        assert run.data.metrics["loss_head4"] == pytest.approx(5.9)
    # The server wrote to its own store: read it without the server.
    stored = MlflowClient(sqlite_uri(tmp_path)).get_run(tracker.run_id)
    assert stored.info.status == "FINISHED"
    assert list((tmp_path / "artifacts").rglob("config.yaml"))


def test_server_down_mid_run_loses_no_step_and_warns_once_each_way(tmp_path, caplog):
    """A real server stopped after step 3 and started again after step 8: MLflow ends with steps 1-10, once each."""
    port, run_dir = free_port(), tmp_path / "run"
    run_dir.mkdir()
    writer = MetricsWriter(str(run_dir / "metrics.jsonl"))
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        with mlflow_server(tmp_path, port) as uri:
            tracker = BackgroundTracker(Tracker(uri, "exp", "remote", None), run_dir, None, close_timeout_s=120)
            feed(tracker, writer, range(1, 4))
            wait_for("steps 1-3 sent", lambda: tracker.sent == 3)
        feed(tracker, writer, range(4, 9))
        wait_for("the outage noticed", lambda: tracker.down)
        with mlflow_server(tmp_path, port):
            feed(tracker, writer, range(9, 11))
            assert tracker.close("FINISHED") is None
            assert logged_steps(uri, tracker.run_id) == list(range(1, 11))
            assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
    assert caplog.text.count("unreachable") == 1 and caplog.text.count("is back") == 1, caplog.text


def test_a_frozen_server_never_blocks_logging_and_close_is_bounded(tmp_path, monkeypatch):
    """SIGSTOPped server, requests that would wait an hour: steps are queued at once; close gives up in time."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3600")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer = MetricsWriter(str(run_dir / "metrics.jsonl"))
    with mlflow_server(tmp_path, free_port()) as uri:
        tracker = BackgroundTracker(Tracker(uri, "exp", "frozen", None), run_dir, None, close_timeout_s=2)
        server = server_pid(tmp_path)
        os.killpg(server, signal.SIGSTOP)
        try:
            feed(tracker, writer, range(1, 200))  # the thread is stuck in a request; the queue takes these
            missing = tracker.close("FINISHED")
        finally:
            os.killpg(server, signal.SIGCONT)
    assert missing and "tracking.close_timeout_s=2" in missing and "next `mtp train`" in missing


def test_resume_while_the_server_is_down_catches_up_from_metrics_jsonl(tmp_path, caplog):
    """Killed at step 4 with MLflow holding steps 1-2; resumed at 4 while the server is down; all of 1-6 arrive."""
    port, run_dir = free_port(), tmp_path / "run"
    run_dir.mkdir()
    with mlflow_server(tmp_path, port) as uri:
        first = Tracker(uri, "exp", "resumed", None)
        first.send(rows(1, 2))
    (run_dir / "mlflow_sent_step").write_text(f"{first.run_id} 2\n")
    writer = MetricsWriter(str(run_dir / "metrics.jsonl"))
    for row in rows(1, 2, 3, 4):
        writer.write_row(row)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        resumed = BackgroundTracker(Tracker(uri, "exp", "ignored", first.run_id), run_dir, 4, close_timeout_s=120)
    assert "training resumes" in caplog.text
    feed(resumed, writer, (5, 6))
    with mlflow_server(tmp_path, port):
        assert resumed.close("FINISHED") is None
        assert logged_steps(uri, first.run_id) == list(range(1, 7))
        assert MlflowClient(uri).get_run(first.run_id).info.status == "FINISHED"


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
    assert tracker.run_id is None and tracker.close() is None

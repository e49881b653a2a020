"""A real `mlflow server` on loopback, started and stopped by a drill or a test.

`mtp bench faults` stops and restarts one under a training run (the
tracking-down drill); the tests use the same server. It runs in a session of
its own so that stopping it ends its gunicorn workers too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_S = 180  # a loaded 2-core machine takes 10-60 s to import mlflow and start gunicorn


@dataclass(frozen=True)
class Server:
    uri: str
    pid: int  # leads the server's process group
    store: str  # the server's own backend store, readable without the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(root: Path, port: int) -> Iterator[Server]:
    """The server on `port`, its store and artifacts under `root`; ready when /health answers, always stopped.

    Starting it again on the same root and port brings back the same store: a server restart.
    """
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    store = f"sqlite:///{root / 'mlflow.db'}"
    log_path = root / f"server-{port}.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", store,
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health", log_path)
        yield Server(f"http://127.0.0.1:{port}", proc.pid, store)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not ready after {READY_S}s:\n{log_path.read_text()[-3000:]}")

"""Helpers for tests that run the real `mtp` command in subprocesses (the shared fixtures: tests/conftest.py).

Training tests run `mtp train` as a child process: DeepSpeed and megatron
keep global process-group state that must not leak between tests.
"""

import os
import subprocess
import sys
from pathlib import Path

MTP = [sys.executable, "-m", "pretrain.cli"]
REPO = Path(__file__).resolve().parents[2]


def mtp_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_mtp(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*MTP, *args], cwd=REPO, env=env or mtp_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mtp {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


"""Shared fixtures for tests that run the real `mtp` command in subprocesses.

Training tests run `mtp train` as a child process: DeepSpeed and megatron
keep global process-group state that must not leak between tests.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Byte-level shards of two stdlib packages: real code, small enough for seconds of training."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("data") / "stdlib-small"
    run_mtp("prepare", "--source", str(stdlib / "json"), str(stdlib / "email"), "--tokenizer", "byte",
            "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "100000", "--workers", "1")
    return out

"""A tiny prepared corpus for the distributed tests: byte-level shards of the stdlib's `json` package."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Real code, a few hundred kilobytes: enough windows of 36 bytes for every run here."""
    json_pkg = Path(sysconfig.get_paths()["stdlib"]) / "json"
    out = tmp_path_factory.mktemp("data") / "stdlib-json"
    env = dict(os.environ)
    subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "prepare", "--source", str(json_pkg), "--tokenizer", "byte",
         "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "100000", "--workers", "1"],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300,
    )
    return out

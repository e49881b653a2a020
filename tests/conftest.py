"""Fixtures every test directory shares (unit, integration, distributed, gpu): pytest finds them by name."""

import sysconfig
from pathlib import Path

import pytest

from tests.integration.conftest import run_mtp


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Byte-level shards of two stdlib packages: real code, small enough for seconds of training."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("data") / "stdlib-small"
    run_mtp("prepare", "--source", str(stdlib / "json"), str(stdlib / "email"), "--tokenizer", "byte",
            "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "100000", "--workers", "1")
    return out

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


# The slowest files (seconds of one file on one worker, the 2-core box; docs/benchmarks.md, "The test
# suite"). `make test`'s workers take whole files in collection order, so these go first: started last,
# one of them would run alone at the end while the other worker idles (longest-first scheduling).
SLOWEST_FILES = (
    "tests/distributed/test_checkpoint_ranks.py",  # 550
    "tests/integration/test_faults.py",  # 440
    "tests/integration/test_reliability.py",  # 350
    "tests/distributed/test_layouts.py",  # 350
    "tests/integration/test_slurm.py",  # 345
    "tests/integration/test_checkpoints.py",  # 280
    "tests/unit/test_tracking.py",  # 255
    "tests/integration/test_train.py",  # 250
    "tests/integration/test_slurm_two_nodes.py",  # 225
    "tests/distributed/test_zero3.py",  # 220
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slowest files first, in SLOWEST_FILES order; every other file keeps its place after them."""
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))

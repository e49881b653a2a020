"""`make docker-test` where no Docker daemon can start: one line naming why, and a failure.

The real build and smoke test run in `make docker-test` (docker/smoke-test.sh)
against a real daemon. Here the failure is made to happen: a client that finds
no daemon, and a `dockerd` that exits at once, under both storage drivers.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tool(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return path


def smoke_test(tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """docker/smoke-test.sh with a client that reaches no daemon and a dockerd that fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "dockerd-calls"
    client = tool(bin_dir, "docker", '[ "$1 $2" = "compose version" ]')  # compose yes, `info` no
    daemon = tool(bin_dir, "mtp-fake-dockerd",
                  f'echo "$*" >> {calls}; echo "failed to start daemon: no storage for $*" >&2; exit 1')
    env = {**os.environ, "DOCKER": str(client), "MTP_DOCKERD": str(daemon),
           "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    proc = subprocess.run(["bash", str(REPO / "docker" / "smoke-test.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may start a Docker daemon; the script says so instead")
def test_no_daemon_can_start_is_one_line_and_a_failure(tmp_path):
    proc, calls = smoke_test(tmp_path)
    assert proc.returncode == 1
    assert [c.split("--storage-driver=")[1].split()[0] for c in calls] == ["overlay2", "vfs"]
    assert proc.stderr.strip().splitlines() == [
        "smoke-test.sh: no Docker daemon could start; last: mtp-fake-dockerd --storage-driver=vfs: "
        f"failed to start daemon: no storage for {calls[1]}"
    ]
    assert proc.stdout.strip().splitlines()[-1] == "docker-test: 0 passed, 1 failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the script starts a daemon of its own")
def test_without_root_the_missing_daemon_is_named(tmp_path):
    proc, calls = smoke_test(tmp_path)
    assert proc.returncode == 1 and calls == []
    assert proc.stderr.strip().splitlines() == [
        "smoke-test.sh: no Docker daemon answers and only root can start one: start Docker "
        "(systemctl start docker) or run as root"
    ]

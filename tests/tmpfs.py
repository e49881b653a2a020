"""A real, small file system for full-disk tests: a tmpfs mounted for the test (root and mount rights needed)."""

import contextlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(parent: Path, size_bytes: int):
    """Mount a tmpfs of `size_bytes` below `parent`; skip the test, saying why, where that is impossible."""
    mount = parent / f"fs-{uuid.uuid4().hex[:8]}"
    mount.mkdir(parents=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the ENOSPC mock tests cover the code path")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs ({done.stderr.strip()}); the ENOSPC mock tests cover it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)

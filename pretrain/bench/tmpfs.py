"""A real, small file system that really fills up: a tmpfs mounted for a drill or a test (root needed).

A full disk is a kernel's answer (ENOSPC from write or fsync, at whatever
byte the space ends), which no mock reproduces faithfully; tmpfs gives the
real one without touching the machine's disks.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path


class CannotMount(RuntimeError):
    """This process may not mount a file system (not root, no mount(8), a container without the right)."""


@contextlib.contextmanager
def small_tmpfs(parent: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted below `parent`; unmounted (lazily, if busy) afterwards."""
    mount = parent / f"fs-{uuid.uuid4().hex[:8]}"
    mount.mkdir(parents=True)
    if shutil.which("mount") is None:
        raise CannotMount("mount(8) is not installed")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CannotMount(done.stderr.strip() or f"mount exited {done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a ballast file until the file system is full; remove it to free the space."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return ballast

"""Full-disk tests mount a real tmpfs (pretrain/bench/tmpfs.py); where that is impossible they say why.

CI runs as root, where mounting works: there a failure to mount fails the
test instead of skipping it, so a full-disk test never passes unrun.
"""

import contextlib
import os
from pathlib import Path

import pytest

from pretrain.bench.tmpfs import CannotMount
from pretrain.bench.tmpfs import small_tmpfs as mount_tmpfs


@contextlib.contextmanager
def small_tmpfs(parent: Path, size_bytes: int):
    try:
        with mount_tmpfs(parent, size_bytes) as mount:
            yield mount
    except CannotMount as err:
        problem = f"cannot mount a tmpfs ({err}); the full-disk tests need root"
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)

"""Atomic, verifiable checkpoints on a filesystem, whatever engine writes the state.

Layout under `root`:

    step_000020/            a committed checkpoint
        ...                 engine files (DeepSpeed `save_checkpoint`, RNG files, ...)
        extra.json          trainer state: step, data cursor, MLflow run id, ...
        manifest.json       sha256 and size of every other file
        COMPLETE            written last, after everything above is fsynced
    .tmp-step_000040/       being written; never read, removed by the next begin/commit

A directory only gets its `step_*` name by an atomic rename after COMPLETE
exists, so a killed writer leaves at most a temp dir behind. `latest()` still
re-hashes every file, because a checkpoint can also be damaged after it was
written (a full disk on copy, a truncated rsync, bit rot).

Multi-rank protocol (the trainer drives it; the store needs a filesystem
every rank sees):
    rank 0: tmp = store.begin(step)        # fresh dir, stale temps removed
    barrier
    all ranks: engine.save_checkpoint(tmp) # same path on every rank: store.tmp_dir(step)
               save_rng_state(tmp, rank)
    barrier
    rank 0: store.commit(tmp, step, extra)
    barrier
Resume: rank 0 calls `latest()` (it hashes every file) and broadcasts the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pretrain.errors import UserError

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"  # sub-directory the engine (DeepSpeed) writes its own files into
MANIFEST = "manifest.json"
EXTRA = "extra.json"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_BLOCK = 1 << 22


class CheckpointStore:
    """Owns where checkpoints live, how they become complete, and which to resume from."""

    def __init__(self, root: str, keep: int):
        if keep < 1:
            raise UserError("checkpoint.keep must be >= 1; the newest checkpoint is always kept")
        self.root = Path(root)
        self.keep = keep

    def tmp_dir(self, step: int) -> str:
        """The temp dir for `step`; a pure function of the step so every rank can compute it."""
        return str(self.root / f"{TMP_PREFIX}{_name(step)}")

    def begin(self, step: int) -> str:
        """Remove temp dirs a killed writer left behind and return a fresh, empty one for `step`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temps()
        tmp = Path(self.tmp_dir(step))
        tmp.mkdir()
        return str(tmp)

    def commit(self, tmp_dir: str, step: int, extra: dict) -> str:
        """Seal `tmp_dir` as the checkpoint of `step` and prune old ones; returns its final path."""
        tmp = Path(tmp_dir)
        if not tmp.is_dir():
            raise FileNotFoundError(f"checkpoint temp dir {tmp} does not exist; call begin() first")
        _write_synced(tmp / EXTRA, json.dumps({**extra, "step": step}, indent=2, sort_keys=True))
        files = {rel: _describe(tmp / rel) for rel in _payload_files(tmp)}
        _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2, sort_keys=True))
        _write_synced(tmp / COMPLETE, f"{step}\n")
        _fsync_tree(tmp)
        final = self.root / _name(step)
        self._replace(tmp, final)
        self._prune(step)
        self._remove_temps()
        return str(final)

    def latest(self) -> tuple[str, dict] | None:
        """The newest complete checkpoint whose files match its manifest, with its extra dict.

        Damaged or partial newer checkpoints are skipped with a warning naming
        them and why; None when no usable checkpoint exists.
        """
        for step, path in reversed(self._step_dirs()):
            problem = verify(path)
            if problem is None:
                return str(path), json.loads((path / EXTRA).read_text())
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """Every `step_*` dir under root, oldest first, complete or not."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def _replace(self, tmp: Path, final: Path) -> None:
        """Rename tmp to final; an existing dir of the same step (an abandoned timeline) goes."""
        if final.exists():
            trash = self.root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)

    def _prune(self, committed: int) -> None:
        """Keep the newest `keep` complete checkpoints up to `committed`; drop the rest.

        Dirs of later steps belong to a timeline the run abandoned when it
        resumed from an older checkpoint: left alone, they would win the next
        `latest()` and send the run back into that timeline.
        """
        steps = self._step_dirs()
        for step, path in steps:
            if step > committed:
                log.warning("removing checkpoint %s: newer than step %d, from an abandoned run", path, committed)
                shutil.rmtree(path)
        complete = [p for step, p in steps if step <= committed and (p / COMPLETE).is_file()]
        kept = set(complete[-self.keep:])
        for step, path in steps:
            if step < committed and path not in kept:
                shutil.rmtree(path)

    def _remove_temps(self) -> None:
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def list(self) -> list[str]:
        """Paths of the checkpoints with a COMPLETE marker, oldest first (not re-hashed)."""
        return [str(p) for _, p in self._step_dirs() if (p / COMPLETE).is_file()]


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used, or None when every file matches its manifest."""
    if not (path / COMPLETE).is_file():
        return "no COMPLETE marker (its writer was interrupted)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        json.loads((path / EXTRA).read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} or {EXTRA}: {err}"
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _name(step: int) -> str:
    return f"step_{step:06d}"


def _payload_files(root: Path) -> list[str]:
    """Relative paths of every file the manifest covers: all but the manifest and marker."""
    rels = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return sorted(r for r in rels if r not in (MANIFEST, COMPLETE))


def _describe(path: Path) -> dict:
    return {"sha256": _sha256(path), "size": path.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory the engine wrote: it may not have fsynced them itself."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng", f"rank_{rank:05d}.pt")


def save_rng_state(ckpt_dir: str, rank: int, device: torch.device) -> None:
    """Save this rank's python, numpy, torch CPU and (on a GPU) its device's generator states."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    path = rng_file(ckpt_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def load_rng_state(ckpt_dir: str, rank: int, device: torch.device) -> bool:
    """Restore what `save_rng_state` wrote for `rank`; False (and a warning) when the file is absent.

    It is absent when the run resumes on more ranks than saved it; those
    ranks keep the generators the trainer seeded.
    """
    path = rng_file(ckpt_dir, rank)
    if not os.path.isfile(path):
        log.warning("no RNG state for rank %d in %s; keeping the freshly seeded generators", rank, ckpt_dir)
        return False
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and device.type == "cuda":  # older checkpoints kept a list
        torch.cuda.set_rng_state(state["cuda"], device)
    return True

"""One rank's share of a checkpoint: its files written, checksummed while written, fsynced; in the background.

The engine (DeepSpeed, through `parallel.ckpt_engine`) hands over what each
of this rank's files should hold (`PendingFile`); `write_files` writes them
with `torch.save` into a file object that checksums every block on its way
to the disk, so no file is read back, then fsyncs file and directory. The
result (`RankResult`: each file's size and digest, or the error) is small
and is what rank 0 gathers into the manifest.

Checksum: xxHash's XXH3-128 (the `xxhash` package, the reference C
library's binding). Measured on this project's CPU box (docs/benchmarks.md):
sha256 1.2-1.8 GB/s, XXH3-128 25-27 GB/s, CRC32C 11-14 GB/s. sha256 is as
slow as a good file system's write and would be the bottleneck; XXH3 adds
well under 10% to a write. It detects damage (truncation, bit rot, a bad
copy), not tampering. Older checkpoints' manifests say sha256, and still
verify (`digest_of`).

Asynchronous saves: `stage` copies every tensor to host memory (pinned on a
GPU) with torch.distributed.checkpoint's `DefaultStager`, which keeps
tensors that share storage sharing it, deep-copies everything else
(DeepSpeed's namedtuples included) and reuses its host buffers from one
save to the next; `BackgroundWriter` then writes the copy from a thread
while training goes on.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

ALGORITHM = "xxh3_128"
HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_BLOCK = 1 << 24  # bytes hashed per call: xxhash holds the GIL while it hashes, so the trainer's thread gets turns


@dataclass
class PendingFile:
    """A file this rank must write: a torch object (`state`) or raw `data`."""

    path: str
    state: Any = None
    data: bytes | None = None


@dataclass
class FileRecord:
    """What the manifest keeps of one file."""

    rel: str  # path inside the checkpoint directory
    size: int
    digest: str
    rank: int  # the writer; on resume it verifies the file again when the world size is the same


@dataclass
class RankResult:
    """One rank's report on its share of a checkpoint; `error` None means every file is on disk and synced."""

    rank: int
    records: list[FileRecord] = field(default_factory=list)
    error: str | None = None
    nbytes: int = 0
    write_s: float = 0.0


class HashingFile:
    """A write-only file object that checksums every byte it is given before writing it.

    torch.save's zip writer turns an exception from `write` into its own
    RuntimeError ("unexpected pos ..."); `error` keeps the OSError (a full
    disk, an I/O error) that caused it.
    """

    def __init__(self, raw, algorithm: str = ALGORITHM):
        self.raw = raw
        self.hash = HASHES[algorithm]() if algorithm else None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.hash is not None:
            for start in range(0, len(view), _BLOCK):
                self.hash.update(view[start:start + _BLOCK])
        written = 0
        try:
            while written < len(view):  # a raw file may write less than asked
                written += self.raw.write(view[written:])
        except OSError as err:
            self.error = self.error or err
            raise
        self.size += written
        return written

    def flush(self) -> None:
        self.raw.flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest() if self.hash is not None else ""


def file_digest(path: Path, algorithm: str) -> str:
    """Digest of a file already on disk (verification, and rank 0's small files at sealing)."""
    digest = HASHES[algorithm]()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def digest_of(entry: dict) -> tuple[str, str] | None:
    """(algorithm, hex digest) of a manifest entry, whichever known algorithm wrote it."""
    for algorithm in HASHES:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    return None


def write_files(files: list[PendingFile], root: str, rank: int, after_first: Callable[[], None] = lambda: None,
                fail: OSError | None = None, algorithm: str = ALGORITHM) -> RankResult:
    """Write, checksum and fsync `files` (paths under `root`); errors are reported, not raised.

    `after_first` runs once the first file is on disk (a fault drill's
    "killed while writing"); `fail` is raised in place of the first write
    (a drill's full disk).
    """
    import torch

    result, start = RankResult(rank), time.monotonic()
    dirs: set[str] = set()
    current, out = "", None
    try:
        for i, pending in enumerate(files):
            current, out = pending.path, None
            if fail is not None:
                raise fail
            Path(current).parent.mkdir(parents=True, exist_ok=True)
            with open(current, "wb", buffering=0) as raw:
                out = HashingFile(raw, algorithm)
                if pending.data is not None:
                    out.write(pending.data)
                else:
                    torch.save(pending.state, out)
                os.fsync(raw.fileno())
            dirs.add(os.path.dirname(current))
            result.records.append(FileRecord(os.path.relpath(current, root), out.size, out.hexdigest(), rank))
            result.nbytes += out.size
            if i == 0:
                after_first()
        for directory in sorted(dirs):
            fsync_path(directory)
    except OSError as err:
        result.error = describe_os_error(err, current)
    except RuntimeError as err:  # torch.save's wrapping of a failed write, or its own failure
        cause = out.error if out is not None else None
        result.error = describe_os_error(cause, current) if cause else f"{err} ({current})"
    result.write_s = time.monotonic() - start
    return result


def describe_os_error(err: OSError, path: str) -> str:
    """"no space left on device (PATH)": the words a user searches for, and the file."""
    text = (err.strerror or str(err)).lower() if err.errno is not None else str(err)
    return f"{text} ({err.filename or path})"


def fsync_path(path: str) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_stager(pinned: bool):
    """torch.distributed.checkpoint's stager: host copies (pinned on GPUs), buffers reused between saves."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=pinned))


def stage(stager, files: list[PendingFile]) -> list[PendingFile]:
    """The same files holding host copies of their tensors: what the background writer may write later."""
    staged = stager.stage([f.state for f in files])
    return [PendingFile(f.path, state, f.data) for f, state in zip(files, staged)]


class BackgroundWriter:
    """At most one save's files written by a thread while training goes on.

    `wanted` is set when the trainer starts waiting for the write (the next
    save, a stop, the end): the slow-save drill holds the write until then.
    """

    def __init__(self, write: Callable[[threading.Event], RankResult]):
        self.wanted = threading.Event()
        self.result: RankResult | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self, write) -> None:
        self.result = write(self.wanted)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float) -> RankResult | None:
        """The result, or None when the write did not finish within `timeout_s`."""
        self.wanted.set()
        self._thread.join(timeout_s)
        return None if self._thread.is_alive() else self.result

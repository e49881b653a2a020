"""`--source` arguments as a stream of files, and the documents each file holds.

Nothing here holds the corpus or a list of its documents: directories are walked
lazily in sorted order, so memory is that of one directory listing, and each file
is read from start to end by the worker that tokenizes it (see formats.py for the
record formats). A document has a stable identity, the name of the file relative
to its `--source` root (plus the record number inside a file of records), which
decides its train/val split and, for `mtp prepare --part`, the part that owns it
(see assign.py): the same corpus gives the same assignment on every machine,
whatever the mount point or the number of workers.
"""

import fnmatch
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.formats import record_format
from pretrain.errors import UserError

STDLIB = "stdlib"
BINARY_PROBE_BYTES = 8192
SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path
    identity: str  # "<source root name>/<path relative to it>": stable across machines
    size: int  # bytes on disk (compressed size for .gz/.zst/.parquet)

    @property
    def records(self) -> bool:
        """True for a file of records (JSONL, Parquet), False for a one-document text file."""
        return record_format(self.path) is not None


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """The `.py` files of the running interpreter's standard library, tests included, site-packages excluded."""
    return [f.path for f in _walk(stdlib_root(), STDLIB, ["*.py"], skip=SKIPPED_DIRS)]


def check_sources(sources: list[str]) -> None:
    """Every source exists and none lies inside another (its documents would be read twice)."""
    roots = []
    for source in sources:
        if source == STDLIB:
            roots.append((source, os.path.realpath(stdlib_root())))
        elif os.path.exists(source):
            roots.append((source, os.path.realpath(source)))
        else:
            raise UserError(f"--source {source}: no such file or directory (or use --source stdlib)")
    for i, (name_a, a) in enumerate(roots):
        for name_b, b in roots[i + 1 :]:
            if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
                raise UserError(f"--source {name_a} and {name_b} overlap: their documents would be read twice; "
                                "pass each file or directory once")


def iter_files(sources: list[str], include: list[str] | None) -> Iterator[SourceFile]:
    """Every non-empty file of every source, sources in the given order, each walked in sorted order."""
    for source in sources:
        if source == STDLIB:
            yield from _walk(stdlib_root(), STDLIB, ["*.py"], skip=SKIPPED_DIRS)
        elif os.path.isdir(source):
            yield from _walk(source, _root_name(source), include or ["*"])
        else:
            size = os.path.getsize(source)
            if size:
                yield SourceFile(os.path.abspath(source), os.path.basename(source), size)


def _root_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _walk(root: str, name: str, include: list[str], skip: tuple[str, ...] = ()) -> Iterator[SourceFile]:
    """Files under `root` matching a glob (by relative path or name); hidden entries skipped."""
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for file_name in sorted(filenames):
            path = os.path.join(dirpath, file_name)
            rel = os.path.relpath(path, root)
            if file_name.startswith(".") or not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(file_name, g)
                                                    for g in include):
                continue
            size = os.path.getsize(path)
            if size:
                yield SourceFile(path, f"{name}/{rel}", size)


def record_prefix(file: SourceFile) -> str:
    """Record i of a file of records is `f"{record_prefix(file)}:{i}"`: the file's identity without the
    format's suffix, so re-compressing a corpus (`.jsonl` to `.jsonl.zst`) or converting it to Parquet
    keeps its split."""
    kind = record_format(file.identity)
    return file.identity[: -len(kind) - 1]


def read_whole(path: str) -> tuple[str, bool] | None:
    """A one-document file's text and whether invalid UTF-8 became U+FFFD; None if it looks binary."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:BINARY_PROBE_BYTES]:
        return None
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True

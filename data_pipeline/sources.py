"""Turn `--source` arguments into a sorted list of documents, and read one back.

A document is a whole text file, or one line of a JSONL file. Listing only records
where each document lies (file, byte range), so worker processes read and tokenize
the documents themselves and the parent never holds the corpus in memory.
"""

import fnmatch
import json
import os
import sysconfig
from dataclasses import dataclass

from pretrain.errors import UserError

STDLIB = "stdlib"
JSONL_SUFFIX = ".jsonl"
BINARY_PROBE_BYTES = 8192


@dataclass(frozen=True)
class DocRef:
    file: int  # index into Corpus.paths
    start: int  # byte range of the document in that file
    end: int
    line: int  # 1-based line number for JSONL documents, 0 for whole files


@dataclass
class Corpus:
    paths: list[str]
    docs: list[DocRef]
    description: str
    skipped_binary: int  # files left out because they look binary

    @property
    def source_bytes(self) -> int:
        return sum(d.end - d.start for d in self.docs)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """The `.py` files of the running interpreter's standard library, tests included, site-packages excluded."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def list_documents(sources: list[str], include: list[str] | None) -> Corpus:
    """Every document of every source, in a deterministic (sorted) order."""
    paths: list[str] = []
    skipped = 0
    for source in sources:
        if source == STDLIB:
            paths.extend(stdlib_files())
        elif os.path.isdir(source):
            files, binary = _directory_files(source, include or ["*"])
            paths.extend(files)
            skipped += binary
        elif os.path.isfile(source):
            paths.append(source)
        else:
            raise UserError(f"--source {source}: no such file or directory (or use --source stdlib)")
    paths = sorted(set(os.path.abspath(p) for p in paths))
    docs = [doc for i, path in enumerate(paths) for doc in _file_documents(i, path)]
    if not docs:
        raise UserError(f"no documents found in --source {' '.join(sources)}; check the paths and --include globs")
    return Corpus(paths=paths, docs=docs, description=" ".join(sources), skipped_binary=skipped)


def _directory_files(root: str, include: list[str]) -> tuple[list[str], int]:
    """Files under `root` matching any glob (by relative path or name); hidden entries and binaries skipped."""
    files, binary = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name.startswith(".") or not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in include):
                continue
            if _looks_binary(path):
                binary += 1
                continue
            files.append(path)
    return files, binary


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_PROBE_BYTES)


def _file_documents(index: int, path: str) -> list[DocRef]:
    if not path.endswith(JSONL_SUFFIX):
        size = os.path.getsize(path)
        return [DocRef(index, 0, size, 0)] if size else []
    docs, offset = [], 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                docs.append(DocRef(index, offset, offset + len(line), line_no))
            offset += len(line)
    return docs


def read_document(path: str, doc: DocRef, text_key: str) -> tuple[str, bool]:
    """The text of one document and whether invalid UTF-8 had to be replaced (U+FFFD)."""
    with open(path, "rb") as f:
        f.seek(doc.start)
        raw = f.read(doc.end - doc.start)
    if doc.line:
        return _jsonl_text(raw, path, doc.line, text_key), False
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _jsonl_text(raw: bytes, path: str, line: int, text_key: str) -> str:
    try:
        obj = json.loads(raw)
    except ValueError as err:
        raise UserError(f"{path}:{line}: not valid JSON ({err}); fix the line or drop the file from --source") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        raise UserError(f"{path}:{line}: no string field {text_key!r}; pass --text-key NAME for the field holding the text")
    return obj[text_key]

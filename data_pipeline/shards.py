"""Shard files: webdataset tars whose samples hold one long run of token ids each.

A sample is `{"__key__": "000042", "tokens.npy": <1-D little-endian uint16/uint32>}`,
so `webdataset.WebDataset(url).decode()` reads it with no project code. Shards are
written (with the standard library's tarfile, exactly as webdataset's TarWriter
writes them) under a temporary name and renamed, with a fixed mtime so the same
input gives byte-identical shards (and the same fingerprint). Reading checks every byte
against the manifest's sha256 while streaming, so the loader never trains on a
corrupt shard.
"""

import hashlib
import io
import os
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from data_pipeline import locations
from data_pipeline.manifest import SAMPLE_KEY, ShardInfo


class ShardError(Exception):
    """A shard that is missing, truncated, altered or unparsable; the message says which and why."""


class _HashingFile:
    """Write-through (or read-through) file wrapper that hashes and counts the bytes."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.raw.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class SplitWriter:
    """Packs documents (already ending in eod) into fixed-size samples and shards for one split.

    Documents run across sample and shard boundaries: the token stream of a split
    is one continuous packed sequence, cut every `sample_tokens` tokens. A full
    shard is handed to a writer thread (tar encoding, sha256, fsync release the
    GIL), so packing goes on while it is written; at most `MAX_PENDING` shards wait.
    """

    MAX_PENDING = 1

    def __init__(self, out_dir: str, split: str, dtype: str, shard_tokens: int, sample_tokens: int, eod_id: int,
                 tag: str = ""):
        self.out_dir = out_dir
        self.split = split
        self.tag = tag  # "" or a part's mark, so parts never write the same name
        self.dtype = np.dtype(dtype)
        self.sample_tokens = min(sample_tokens, shard_tokens)
        self.samples_per_shard = max(1, shard_tokens // self.sample_tokens)
        self.eod_id = eod_id
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shard_samples: list[np.ndarray] = []
        self.written: list[Future] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"shard-writer-{split}")

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens < self.sample_tokens:
            return
        run = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]  # [pending_tokens]
        full = len(run) // self.sample_tokens * self.sample_tokens
        for start in range(0, full, self.sample_tokens):
            self._add_sample(run[start : start + self.sample_tokens])
        rest = run[full:]
        self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)

    def close(self) -> list[ShardInfo]:
        """Flush the partial last sample and shard; return what was written, in order."""
        if self.pending_tokens:
            self._add_sample(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0
        if self.shard_samples:
            self._write_shard()
        try:
            return [f.result() for f in self.written]
        finally:
            self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _add_sample(self, sample: np.ndarray) -> None:
        self.shard_samples.append(sample)
        if len(self.shard_samples) == self.samples_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        name = f"{self.split}-{self.tag + '-' if self.tag else ''}{len(self.written):06d}.tar"
        unfinished = [f for f in self.written if not f.done()]
        if len(unfinished) >= self.MAX_PENDING:
            unfinished[0].result()  # bounded memory: wait for the oldest
        self.written.append(self.pool.submit(write_shard, self.out_dir, name, self.split, self.shard_samples,
                                             self.dtype, self.eod_id, self.sample_tokens))
        self.shard_samples = []


def write_shard(out_dir: str, name: str, split: str, samples: list[np.ndarray], dtype: np.dtype, eod_id: int,
                sample_size: int) -> ShardInfo:
    """Write one tar atomically (temp name, fsync, rename) and describe it."""
    final = os.path.join(out_dir, name)
    temp = final + ".tmp"
    with open(temp, "wb") as raw:
        hashed = _HashingFile(raw)
        with tarfile.open(fileobj=hashed, mode="w|") as tar:
            for index, sample in enumerate(samples):
                _add_member(tar, f"{index:06d}.{SAMPLE_KEY}", _npy_bytes(sample.astype(dtype, copy=False)))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(temp, final)
    return ShardInfo(
        name=name,
        split=split,
        samples=len(samples),
        tokens=sum(len(s) for s in samples),
        documents=int(sum(np.count_nonzero(s == eod_id) for s in samples)),
        sha256=hashed.sha.hexdigest(),
        bytes=hashed.nbytes,
        sample_size=sample_size,
    )


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member as webdataset's TarWriter(mtime=0, user="mtp", group="mtp") writes it, byte for byte.

    The standard library's tarfile, not webdataset's writer: importing webdataset
    imports torch (seconds), which `mtp prepare` otherwise never needs.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "mtp", "mtp"
    tar.addfile(info, io.BytesIO(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array)
    return stream.getvalue()


def read_shard(location: str, shard: ShardInfo, dtype: str) -> np.ndarray:
    """All tokens of a shard, its samples concatenated in order: [shard.tokens].

    Raises ShardError if the shard cannot be opened, does not parse, or differs from
    the manifest in any byte (size, sha256, sample count or sample lengths).
    """
    url = locations.resolve(location, shard.name)
    try:
        samples, sha, nbytes = _read_members(url)
    except Exception as err:  # noqa: BLE001 -- damaged bytes surface as OSError, TarError, EOFError, struct.error, ...
        raise ShardError(f"shard {url}: cannot be read ({_short(err)})") from None
    if nbytes != shard.bytes:
        raise ShardError(f"shard {url}: {nbytes} bytes, manifest says {shard.bytes} (truncated or replaced)")
    if sha != shard.sha256:
        raise ShardError(f"shard {url}: sha256 differs from the manifest (corrupted)")
    return _check_samples(url, samples, shard, np.dtype(dtype))


def _read_members(url: str) -> tuple[list[tuple[str, bytes]], str, int]:
    """(member name, bytes) of every regular file, and the sha256/size of the whole stream."""
    from webdataset.tariterators import tar_file_iterator

    stream = locations.open_url(url)
    try:
        hashed = _HashingFile(stream)
        members = [(m["fname"], m["data"]) for m in tar_file_iterator(hashed, skip_meta=None)]
        hashed.drain()
    finally:
        stream.close()  # raises for a pipe: URL whose command failed
    return members, hashed.sha.hexdigest(), hashed.nbytes


def _check_samples(url: str, members: list[tuple[str, bytes]], shard: ShardInfo, dtype: np.dtype) -> np.ndarray:
    if len(members) != shard.samples:
        raise ShardError(f"shard {url}: {len(members)} samples, manifest says {shard.samples}")
    arrays = []
    for (name, data), expected in zip(members, shard.sample_tokens):
        if not name.endswith("." + SAMPLE_KEY):
            raise ShardError(f"shard {url}: unexpected member {name}")
        try:
            array = np.lib.format.read_array(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 -- a malformed .npy header raises ValueError, SyntaxError, ...
            raise ShardError(f"shard {url}: sample {name} is not a .npy array ({_short(err)})") from None
        if array.dtype != dtype or array.ndim != 1 or len(array) != expected:
            raise ShardError(f"shard {url}: sample {name} is {array.dtype}{list(array.shape)}, manifest says {dtype}[{expected}]")
        arrays.append(array)
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def _short(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]

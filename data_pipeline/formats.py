"""Reading the files corpora come in, one record at a time, each file sequentially.

A file is either one document (any text file) or a file of records, one document
each: JSON Lines (`.jsonl`, gzip-compressed `.jsonl.gz`, Zstandard-compressed
`.jsonl.zst`) or Parquet (`.parquet`, the Hugging Face datasets format). The format
is told by the name. Decompression and Parquet decoding use well-kept libraries
(Python's `gzip`, `zstandard`, `pyarrow`), never a parser of our own, and every
reader streams: memory stays that of one record (JSONL) or one record batch
(Parquet), whatever the size of the file.

Damaged input (a truncated `.zst`, a file that is not Parquet, a line that is not
JSON, a record without the text field) raises UserError naming the file, the
record and the fix.
"""

import gzip
import io
import json
from collections.abc import Callable, Iterator

from pretrain.errors import UserError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: bounded memory, few calls
READ_BLOCK = 1 << 20


def record_format(path: str) -> str | None:
    """"jsonl", "jsonl.gz", "jsonl.zst" or "parquet" for a file of records, None for a one-document file."""
    for suffix in RECORD_SUFFIXES:
        if path.endswith(suffix):
            return suffix[1:]
    return None


def iter_records(path: str, text_key: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, str]]:
    """(record index, text) of every record of a record file for which `wanted(index)` holds.

    Records are numbered in file order from 0 (blank JSONL lines are not records).
    `wanted` is asked before a record is parsed, so records that another part of
    a split preparation owns cost a line split, not a JSON parse.
    """
    kind = record_format(path)
    if kind == "parquet":
        yield from _parquet_records(path, text_key, wanted)
        return
    try:
        with _open_lines(path, kind) as lines:
            yield from _jsonl_records(lines, path, text_key, wanted)
    except _read_errors(kind) as err:
        raise UserError(f"{path}: cannot be read as {kind} ({_short(err)}); re-download or re-compress it, "
                        "or drop it from --source") from None


def _open_lines(path: str, kind: str):
    """A binary line iterator over the decompressed bytes of a JSONL file."""
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), READ_BLOCK)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a `.zst` file of one or more frames (zstandard's decompressobj).

    zstandard's `stream_reader` reports a cut-off file as a clean end of data; here
    input that ends inside a frame raises EOFError, so a truncated download is an error.
    """

    def __init__(self, raw):
        import zstandard

        self.raw = raw
        self.zstd = zstandard.ZstdDecompressor()
        self.frame = self.zstd.decompressobj()
        self.started = False  # the current frame has received input
        self.out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.out:
            data = self.raw.read(READ_BLOCK)
            if not data:
                if self.started:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self.out = memoryview(self._decompress(data))
        n = min(len(buffer), len(self.out))
        buffer[:n] = self.out[:n]
        self.out = self.out[n:]  # a view: no copy of the rest
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self.started = True
            out.append(self.frame.decompress(data))
            if not self.frame.eof:
                break
            data = self.frame.unused_data  # the next frame starts here
            self.frame, self.started = self.zstd.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _read_errors(kind: str) -> tuple[type[Exception], ...]:
    """What a damaged file raises while it is decompressed: truncation, bad headers, bad frames."""
    if kind == "jsonl.zst":
        import zstandard

        return OSError, EOFError, zstandard.ZstdError
    return OSError, EOFError


def _jsonl_records(lines, path: str, text_key: str, wanted) -> Iterator[tuple[int, str]]:
    index = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if wanted(index):
            yield index, _json_text(line, path, line_no, text_key)
        index += 1


def _json_text(line: bytes, path: str, line_no: int, text_key: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise UserError(f"{path}:{line_no}: not valid JSON ({err}); fix the line or drop the file from --source") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        raise UserError(f"{path}:{line_no}: no string field {text_key!r}; pass --text-key NAME for the field holding the text")
    return obj[text_key]


def _parquet_records(path: str, text_key: str, wanted) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: not a readable Parquet file ({_short(err)}); re-download it or drop it from --source") from None
    with file:
        field = file.schema_arrow.field(text_key) if text_key in file.schema_arrow.names else None
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise UserError(f"{path}: no string column {text_key!r} (columns: {', '.join(file.schema_arrow.names)}); "
                            "pass --text-key NAME for the column holding the text")
        index = 0
        try:
            for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key], use_threads=False):
                for text in batch.column(0).to_pylist():
                    if wanted(index):
                        yield index, text if text is not None else ""
                    index += 1
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{path}: Parquet data cannot be decoded after record {index} ({_short(err)}); "
                            "re-download it or drop it from --source") from None


def _short(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]

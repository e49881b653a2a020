"""Every corpus format round-trips through `prepare`; damaged files are one clear UserError."""

import gzip
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.formats import iter_records, record_format
from data_pipeline.prepare import PrepareConfig, prepare
from pretrain.errors import UserError
from tests.unit.test_data_prepare import _documents

ROWS = [{"body": f"record {i}: " + "é" * (i % 7) + " <|endoftext|>" * (i % 3 == 0), "id": i} for i in range(60)]
TEXTS = [r["body"] for r in ROWS]


def _jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"\n"  # a trailing blank line is no record


def _write(path, kind: str, rows=ROWS) -> str:
    path = str(path)
    if kind == "jsonl":
        open(path, "wb").write(_jsonl_bytes(rows))
    elif kind == "jsonl.gz":
        with gzip.open(path, "wb") as f:
            f.write(_jsonl_bytes(rows))
    elif kind == "jsonl.zst":
        open(path, "wb").write(zstandard.ZstdCompressor(level=3).compress(_jsonl_bytes(rows)))
    elif kind == "parquet":
        pq.write_table(pa.table({"id": [r["id"] for r in rows], "body": [r["body"] for r in rows]}), path,
                       row_group_size=17)  # several row groups
    return path


def _prepare(tmp_path, sources, **kw):
    settings = dict(text_key="body", val_fraction=0.2, workers=1, shard_tokens=500, sample_tokens=100)
    settings.update(kw)
    return prepare(PrepareConfig(out=str(tmp_path / "out"), sources=sources, **settings))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_every_record_format_round_trips(tmp_path, kind):
    path = _write(tmp_path / f"corpus.{kind}", kind)
    assert record_format(path) == kind
    assert [text for _, text in iter_records(path, "body", lambda i: True)] == TEXTS
    assert [i for i, _ in iter_records(path, "body", lambda i: i % 5 == 0)] == list(range(0, 60, 5))
    result = _prepare(tmp_path, [path], workers=2)
    assert Counter(_documents(result.out)) == Counter(TEXTS)
    assert 0 < result.manifest.splits["val"]["documents"] < len(TEXTS)


def test_a_directory_mixes_formats_and_text_files(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i, kind in enumerate(["jsonl", "jsonl.gz", "jsonl.zst", "parquet"]):
        _write(src / f"part{i}.{kind}", kind, ROWS[i * 15 : (i + 1) * 15])
    (src / "notes.txt").write_text("a plain text file is one document\n")
    result = _prepare(tmp_path, [str(src)], workers=2)
    assert Counter(_documents(result.out)) == Counter(TEXTS + ["a plain text file is one document\n"])


def test_the_same_corpus_in_any_format_gives_the_same_tokens(tmp_path):
    fingerprints = set()
    for kind in ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"]:
        (tmp_path / kind).mkdir()
        path = _write(tmp_path / kind / f"c.{kind}", kind)
        result = prepare(PrepareConfig(out=str(tmp_path / kind / "out"), sources=[path], text_key="body",
                                       val_fraction=0.2, workers=1))
        fingerprints.add(tuple(s.sha256 for s in result.manifest.shards))
    assert len(fingerprints) == 1  # a record's identity is its file's name without the format suffix + its number


def _truncated_zst(tmp_path) -> str:
    path = _write(tmp_path / "bad.jsonl.zst", "jsonl.zst")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _not_parquet(tmp_path) -> str:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    return str(path)


def _truncated_gz(tmp_path) -> str:
    path = _write(tmp_path / "bad.jsonl.gz", "jsonl.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-20])
    return path


@pytest.mark.parametrize("make, message", [
    (_truncated_zst, r"bad.jsonl.zst: cannot be read as jsonl.zst"),
    (_not_parquet, r"bad.parquet: not a readable Parquet file"),
    (_truncated_gz, r"bad.jsonl.gz: cannot be read as jsonl.gz"),
])
def test_damaged_files_are_user_errors_and_nothing_is_written(tmp_path, make, message):
    path = make(tmp_path)
    for workers in (1, 2):
        with pytest.raises(UserError, match=message):
            _prepare(tmp_path, [path], workers=workers)
        assert not os.path.exists(tmp_path / "out")
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_parquet_without_the_text_column_names_the_columns(tmp_path):
    path = _write(tmp_path / "c.parquet", "parquet")
    with pytest.raises(UserError, match=r"no string column 'text' \(columns: id, body\).*--text-key"):
        _prepare(tmp_path, [path], text_key="text")

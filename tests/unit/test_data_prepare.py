"""`prepare`: documents survive tokenization and packing exactly; manifest, atomicity, errors."""

import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest

from data_pipeline.manifest import compute_fingerprint, load_manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shards import read_shard
from data_pipeline.sources import stdlib_root
from data_pipeline.tokenizer import load_tokenizer
from pretrain.errors import UserError

EMAIL = os.path.join(stdlib_root(), "email")


def _config(out, **overrides) -> PrepareConfig:
    settings = dict(sources=[EMAIL], include=["*.py"], shard_tokens=40_000, sample_tokens=12_000, val_fraction=0.1, workers=1)
    settings.update(overrides)
    return PrepareConfig(out=str(out), **settings)


def _source_texts(root: str) -> list[str]:
    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")]
    texts = []
    for path in paths:
        with open(path, "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    return [t for t in texts if t]


def _documents(out: str, split: str | None = None) -> list[str]:
    """Every document in the shards, found by splitting the token stream at eod."""
    manifest = load_manifest(out)
    tok = load_tokenizer(out)
    docs = []
    for shard_split in ("train", "val"):
        if split not in (None, shard_split):
            continue
        shards = manifest.split_shards(shard_split)
        if not shards:
            continue
        stream = np.concatenate([read_shard(out, s, manifest.dtype) for s in shards])  # [split tokens]
        ends = np.nonzero(stream == tok.eod_id)[0]
        assert ends[-1] == len(stream) - 1  # the stream ends with a whole document
        starts = np.concatenate([[0], ends[:-1] + 1])
        docs += [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, ends)]
    return docs


@pytest.fixture(scope="module")
def byte_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "byte"
    return prepare(_config(out, workers=2))


def test_every_document_comes_back_exactly_once(byte_set):
    assert Counter(_documents(byte_set.out)) == Counter(_source_texts(EMAIL))
    n_docs = len(_source_texts(EMAIL))
    n_val = byte_set.manifest.splits["val"]["documents"]
    assert 0 < n_val < 0.3 * n_docs  # each document goes to val with probability 0.1, by a hash of its name
    assert len(_documents(byte_set.out, "val")) == n_val


def test_the_split_is_decided_per_document_by_its_name(tmp_path):
    from data_pipeline.assign import Assigner

    rows = [f"row {i}" for i in range(2000)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    result = prepare(_config(tmp_path / "out", sources=[str(path)], val_fraction=0.1, workers=2))
    val = set(_documents(result.out, "val"))
    assigner = Assigner(seed=0, val_fraction=0.1)
    assert val == {r for i, r in enumerate(rows) if assigner.split_of(f"c:{i}") == "val"}
    assert 150 < len(val) < 250


def test_manifest_matches_the_files(byte_set):
    out, manifest = byte_set.out, load_manifest(byte_set.out)
    assert manifest.fingerprint == compute_fingerprint(manifest) == byte_set.manifest.fingerprint
    assert len(manifest.split_shards("train")) >= 3  # small shards: several per split
    for shard in manifest.shards:
        data = open(os.path.join(out, shard.name), "rb").read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
        assert shard.samples == len(shard.sample_tokens)
        assert all(n <= 12_000 for n in shard.sample_tokens)
    for split in ("train", "val"):
        shards = manifest.split_shards(split)
        assert manifest.splits[split]["tokens"] == sum(s.tokens for s in shards)
        assert manifest.splits[split]["documents"] == sum(s.documents for s in shards)
    assert manifest.dtype == "<u2" and manifest.tokenizer["type"] == "byte"
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "tokenizer_info.json"] + [s.name for s in manifest.shards])


def test_output_is_identical_whatever_the_worker_count(byte_set, tmp_path):
    single = prepare(_config(tmp_path / "one", workers=1))
    assert single.manifest.fingerprint == byte_set.manifest.fingerprint
    assert [s.sha256 for s in single.manifest.shards] == [s.sha256 for s in byte_set.manifest.shards]


def test_another_seed_gives_another_split(byte_set, tmp_path):
    other = prepare(_config(tmp_path / "seed1", seed=1))
    assert set(_documents(other.out, "val")) != set(_documents(byte_set.out, "val"))


def test_bpe_data_set_round_trips_and_stores_its_tokenizer(tmp_path):
    result = prepare(_config(tmp_path / "bpe", tokenizer="bpe:700", workers=2))
    assert os.path.isfile(os.path.join(result.out, "tokenizer.json"))
    tok = load_tokenizer(result.out)
    assert result.manifest.tokenizer["vocab_size"] == tok.vocab_size <= 700
    assert Counter(_documents(result.out)) == Counter(_source_texts(EMAIL))
    assert result.tokens < 0.7 * result.source_bytes  # BPE compresses


def test_jsonl_source_with_text_key(tmp_path):
    rows = [{"content": f"document {i}: " + "é" * i, "id": i} for i in range(40)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = prepare(_config(tmp_path / "out", sources=[str(path)], text_key="content"))
    assert Counter(_documents(result.out)) == Counter(r["content"] for r in rows)


def test_directory_globs_and_binary_files(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print('a')\n")
    (src / "b.txt").write_text("bee\n")
    (src / "c.bin").write_bytes(b"\x00\x01\x02")
    (src / ".hidden.py").write_text("secret\n")
    everything = prepare(_config(tmp_path / "all", sources=[str(src)], include=None, val_fraction=0.0))
    assert sorted(_documents(everything.out)) == ["bee\n", "print('a')\n"]
    assert everything.stats.skipped_binary == 1
    only_py = prepare(_config(tmp_path / "py", sources=[str(src)], include=["*.py"], val_fraction=0.0))
    assert _documents(only_py.out) == ["print('a')\n"]


def test_refuses_to_overwrite_without_the_flag(byte_set, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        prepare(_config(out))
    assert os.listdir(out) == ["keep.txt"]
    prepare(_config(out, overwrite=True))
    assert "keep.txt" not in os.listdir(out) and "manifest.json" in os.listdir(out)


def test_failure_midway_keeps_the_old_output_and_leaves_no_temp(tmp_path):
    out = tmp_path / "data"
    prepare(_config(out))
    before = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(_config(out, sources=[EMAIL, str(bad)], overwrite=True, workers=2))
    assert {name: open(out / name, "rb").read() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "data"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sources=["/no/such/dir"]), "no such file"),
        (dict(tokenizer="bpe:x"), "--tokenizer"),
        (dict(val_fraction=1.0), "--val-fraction"),
        (dict(workers=0), "--workers"),
        (dict(include=["*.nothing"]), "no documents"),
    ],
)
def test_bad_inputs_are_user_errors(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        prepare(_config(tmp_path / "out", **overrides))
    assert not os.path.exists(tmp_path / "out")


def test_jsonl_without_the_text_key(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="--text-key"):
        prepare(_config(tmp_path / "out", sources=[str(path)], val_fraction=0.0))
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]

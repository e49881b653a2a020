"""Preparation in parts: parts + merge == one prepare, idempotent re-runs, refusals that keep the disk as it was."""

import os
from collections import Counter

import pytest

from data_pipeline.manifest import load_manifest
from data_pipeline.parts import merge
from data_pipeline.prepare import prepare
from data_pipeline.verify import verify
from pretrain.errors import UserError
from tests.unit.test_data_prepare import EMAIL, _config, _documents


def _part(out, spec: str, **kw):
    return prepare(_config(out, part=spec, **kw))


def _files(directory) -> dict[str, bytes]:
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return prepare(_config(tmp_path_factory.mktemp("whole") / "data", workers=2))


@pytest.fixture(scope="module")
def in_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts") / "data"
    results = [_part(out, f"{i}/3", workers=1 + i % 2) for i in (2, 0, 1)]  # any order, any worker count
    assert [r.merged for r in results] == [False, False, True]  # the last part to finish merged
    return str(out)


def test_parts_merged_hold_the_documents_and_tokens_of_one_prepare(whole, in_parts):
    merged = load_manifest(in_parts)
    assert merged.parts == 3
    for split in ("train", "val"):
        assert Counter(_documents(in_parts, split)) == Counter(_documents(whole.out, split))
        assert merged.splits[split]["tokens"] == whole.manifest.splits[split]["tokens"]
        assert merged.splits[split]["documents"] == whole.manifest.splits[split]["documents"]
    assert merged.source["documents"] == whole.manifest.source["documents"]
    assert verify(in_parts)[1] == []
    names = [s.name for s in merged.shards]
    assert len(set(names)) == len(names) and all("of00003-" in n for n in names)


def test_each_document_is_in_exactly_one_part(in_parts):
    per_part = []
    for i in range(3):
        part_dir = os.path.join(in_parts, "parts", f"{i:05d}of00003")
        per_part.append(sum(s.documents for s in load_manifest(part_dir).shards))
    assert all(n > 0 for n in per_part)
    assert sum(per_part) == load_manifest(in_parts).source["documents"]


def test_rerunning_a_part_gives_the_same_bytes(in_parts):
    before = _files(in_parts)
    rerun = _part(in_parts, "1/3", workers=2)
    assert rerun.merged
    assert _files(in_parts) == before


def test_merge_refuses_while_a_part_is_missing(tmp_path):
    out = tmp_path / "data"
    _part(out, "0/3")
    _part(out, "2/3")
    with pytest.raises(UserError, match=r"1 of 3 parts are missing \(1/3\).*--part 1/3"):
        merge(str(out))
    assert not (out / "manifest.json").exists()


def test_merge_refuses_parts_with_different_tokenizers(tmp_path, whole):
    out = tmp_path / "data"
    _part(out, "0/2")
    bpe = prepare(_config(tmp_path / "bpe", tokenizer="bpe:300"))
    with pytest.raises(UserError, match=r"parts 0/2 and 1/2 were prepared with different tokenizers \(byte 258 ids "
                                        r"vs bpe \d+ ids, tokenizer.json sha256 [0-9a-f]{12}\)"):
        _part(out, "1/2", tokenizer=bpe.out)
    assert not (out / "manifest.json").exists()
    assert sorted(os.listdir(out / "parts")) == ["00000of00002", "00001of00002"]  # the part itself is kept


@pytest.mark.parametrize("overrides, message", [
    (dict(part="3/3"), r"--part 3/3: parts of 3 are numbered 0..2"),
    (dict(part="1"), r"--part 1: write it as I/N"),
    (dict(part="0/2", tokenizer="bpe:300"), r"every part would learn its own BPE"),
])
def test_bad_part_arguments(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        prepare(_config(tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_a_part_refuses_other_outputs_and_other_settings(tmp_path, whole):
    with pytest.raises(UserError, match="not parts of a split preparation"):
        _part(whole.out, "0/2")
    out = tmp_path / "data"
    _part(out, "0/2")
    with pytest.raises(UserError, match="preparation in 2 parts, not 3"):
        _part(out, "0/3")
    before = _files(out)
    with pytest.raises(UserError, match=r"part 0/2 .* other settings.*--overwrite"):
        _part(out, "0/2", seed=5)
    assert _files(out) == before
    _part(out, "0/2", seed=5, overwrite=True)  # replaced on request
    assert load_manifest(str(out / "parts" / "00000of00002")).seed == 5


def test_merge_of_a_directory_without_parts(tmp_path):
    with pytest.raises(UserError, match="holds no parts"):
        merge(str(tmp_path))


def test_overlapping_sources_are_refused(tmp_path):
    with pytest.raises(UserError, match="overlap"):
        prepare(_config(tmp_path / "out", sources=[EMAIL, os.path.join(EMAIL, "mime")]))

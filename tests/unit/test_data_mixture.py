"""Weighted mixtures: the position -> source function, proportions, per-source exactly-once across resumes."""

import json
import os
import types

import numpy as np
import pytest
import torch

from data_pipeline.feed import open_loader, source_metrics, weighted_validation
from data_pipeline.loader import Source, StreamingLoader, split_sample_ids
from data_pipeline.manifest import MANIFEST_FILE, load_manifest
from data_pipeline.mixture import BLOCK, Mixture
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shards import read_shard
from data_pipeline.sources import stdlib_root
from pretrain.errors import UserError

SEQ, NF, MB, GLOBAL = 64, 2, 4, 24  # 24 = 4 x 6: dp 1, 2, 3 and 6 all fit
WEIGHTS = [5.0, 3.0, 2.0]


def test_counts_follow_the_weights_exactly_at_block_boundaries():
    mix = Mixture([0.7, 0.2, 0.1, 1e-3], seed=3)
    shares = np.array([0.7, 0.2, 0.1, 1e-3]) / 1.001
    for block in (1, 2, 7, 1000, 10**9):
        counts = mix.before_block(block)
        assert counts.sum() == BLOCK * block
        assert np.all(np.abs(counts - shares * BLOCK * block) <= 4)  # the heaviest absorbs the others' rounding
        assert np.all(mix.before_block(block + 1) >= counts)


def test_each_source_gets_its_own_positions_without_gap_or_repeat():
    mix = Mixture(WEIGHTS, seed=11)
    positions = np.arange(3 * BLOCK + 123)
    sources, local = mix.locate(positions)
    for s in range(3):
        assert local[sources == s].tolist() == list(range(int((sources == s).sum())))
    for q in (0, 1, 999, BLOCK, 2 * BLOCK + 5, len(positions)):
        assert mix.consumed(q).tolist() == np.bincount(sources[:q], minlength=3).tolist()
    late = np.arange(10**12, 10**12 + 50)  # a late step is located without walking the stream
    late_sources, late_local = mix.locate(late)
    assert np.array_equal(late_local, mix.consumed(10**12)[late_sources] + [
        int((late_sources[:i] == late_sources[i]).sum()) for i in range(50)])


def test_the_mixture_is_a_pure_function_of_seed_and_position():
    a = Mixture(WEIGHTS, seed=1).locate(np.arange(5000))[0]
    b = Mixture(WEIGHTS, seed=1).locate(np.arange(5000))[0]
    c = Mixture(WEIGHTS, seed=2).locate(np.arange(5000))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert Mixture(WEIGHTS, 1).locate(np.arange(4000, 4100))[0].tolist() == a[4000:4100].tolist()


@pytest.mark.parametrize("weights, message", [([1, 0], r"\[1\].weight"), ([-1.0], r"\[0\].weight"),
                                               ([1, float("nan")], "positive"), ([], "empty")])
def test_non_positive_weights_are_refused(weights, message):
    with pytest.raises(UserError, match=message):
        Mixture(weights, seed=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Source]:
    """Three byte-level sources of very different sizes: the smallest wraps into new epochs first."""
    found = []
    for name in ("tomllib", "json", "email"):
        out = tmp_path_factory.mktemp("mix") / name
        prepare(PrepareConfig(out=str(out), sources=[os.path.join(stdlib_root(), name)], include=["*.py"],
                              shard_tokens=20_000, sample_tokens=5_000, val_fraction=0.3, workers=1))
        found.append(str(out))
    return [Source(path, weight, os.path.basename(path)) for path, weight in zip(found, WEIGHTS)]


def _loaders(sources, dp_size, state=None, **kw):
    loaders = [StreamingLoader(sources, "train", SEQ, NF, MB, GLOBAL, dp_rank=r, dp_size=dp_size, seed=7,
                               block_shards=2, **kw) for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    return loaders


def _run(sources, steps, dp_size, state=None, **kw) -> tuple[list[int], dict]:
    """The sample ids of `steps` global batches in stream order, and the cursor after them."""
    loaders = _loaders(sources, dp_size, state, **kw)
    iterators = [iter(loader) for loader in loaders]
    ids = []
    for _ in range(steps):
        for loader, it in zip(loaders, iterators):
            for _ in range(loader.micro_batches_per_step):
                ids += next(it)["sample_ids"].tolist()
    states = [loader.state_dict() for loader in loaders]
    for it in iterators:
        it.close()
    assert all(s == states[0] for s in states)
    return ids, states[0]


def _per_source(ids: list[int]) -> list[list[int]]:
    source, window = split_sample_ids(np.array(ids, dtype=np.int64))
    return [window[source == s].tolist() for s in range(3)]


def test_observed_proportions_match_the_weights(sources):
    steps = 4 * BLOCK // GLOBAL + 1
    ids, state = _run(sources, steps, dp_size=1)
    counts = np.bincount(split_sample_ids(np.array(ids))[0], minlength=3)
    assert np.all(np.abs(counts / counts.sum() - np.array(WEIGHTS) / 10) < 0.005)
    assert [s["samples"] for s in state["sources"]] == counts.tolist()


def test_resume_on_other_dp_sizes_continues_every_source_exactly(sources):
    steps = 150
    reference, end_state = _run(sources, steps, dp_size=1)
    first, state = _run(sources, 37, dp_size=2)
    second, state = _run(sources, 51, dp_size=3, state=state)
    third, state = _run(sources, steps - 88, dp_size=1, state=state)
    assert first + second + third == reference and state == end_state
    for source, windows in zip(sources, _per_source(reference)):  # each source: its own stream, exactly once
        alone = StreamingLoader(source.location, "train", SEQ, NF, MB, MB, seed=7, block_shards=2)
        it = iter(alone)
        own = [i for _ in range(-(-len(windows) // MB)) for i in next(it)["sample_ids"].tolist()]
        it.close()
        assert windows == own[: len(windows)]
    epochs = [s["epoch"] for s in end_state["sources"]]
    assert epochs[0] >= 1 and epochs[2] == 0  # the small heavy source rolled over, the big light one did not


def test_mixed_batches_hold_the_windows_their_ids_name(sources):
    streams = []
    for source in sources:
        manifest = load_manifest(source.location)
        shards = [read_shard(source.location, s, manifest.dtype) for s in manifest.split_shards("train")]
        first_id = np.concatenate([[0], np.cumsum([(len(s) - NF) // SEQ for s in shards])])
        streams.append((shards, first_id))
    it = iter(_loaders(sources, 1)[0])
    for _ in range(20):
        batch = next(it)
        for row, (s, window) in enumerate(zip(*split_sample_ids(batch["sample_ids"].numpy()))):
            shards, first_id = streams[s]
            shard = int(np.searchsorted(first_id, window, side="right")) - 1
            start = (window - first_id[shard]) * SEQ
            expected = torch.from_numpy(shards[shard][start : start + SEQ + NF].astype(np.int64))
            assert torch.equal(batch["input_ids"][row], expected[:SEQ])
            assert torch.equal(batch["labels"][row, NF - 1], expected[NF : NF + SEQ])
    it.close()


def test_a_cursor_of_another_mixture_is_refused(sources):
    _, state = _run(sources, 2, dp_size=1)
    reweighted = [Source(s.location, 1.0, s.name) for s in sources]
    with pytest.raises(UserError, match="saved for the mixture tomllib \\(weight 5.0"):
        _loaders(reweighted, 1, state)
    with pytest.raises(UserError, match="saved for a mixture of 3 sources but this run reads one data set"):
        StreamingLoader(sources[0].location, "train", SEQ, NF, MB, GLOBAL, seed=7, block_shards=2).load_state_dict(state)


def _data_cfg(sources, **kw):
    entries = [types.SimpleNamespace(dir=s.location, weight=s.weight, name=None) for s in sources]
    return types.SimpleNamespace(dir="unused", sources=entries, seed=7, num_workers=0, on_bad_shard="error", **kw)


def test_open_loader_mixes_names_and_validates_per_source(sources):
    cfg = _data_cfg(sources)
    train = open_loader(cfg, "train", SEQ, NF, MB, GLOBAL, dp_rank=0, dp_size=1)
    it = iter(train)
    for _ in range(train.micro_batches_per_step * 3):
        next(it)
    it.close()
    metrics = source_metrics(train)
    assert list(metrics) == ["tokens/tomllib", "tokens/json", "tokens/email"]
    assert sum(metrics.values()) == 3 * GLOBAL * SEQ
    val = open_loader(cfg, "val", SEQ, NF, MB, GLOBAL, dp_rank=0, dp_size=1, source="json")
    assert val.sources[0].location == sources[1].location and val.mixture is None
    assert weighted_validation(cfg, {"tomllib": [1.0, 2.0], "json": [2.0, 2.0], "email": [3.0, 2.0]}) == \
        pytest.approx([0.5 * 1 + 0.3 * 2 + 0.2 * 3, 2.0])
    one = types.SimpleNamespace(dir=sources[1].location, sources=[], seed=7, num_workers=0, on_bad_shard="error")
    single = open_loader(one, "train", SEQ, NF, MB, GLOBAL, dp_rank=0, dp_size=1)
    assert "sources" not in single.state_dict() and list(source_metrics(single)) == ["tokens/json"]


def test_version_1_manifests_load_with_the_same_fingerprint(sources, tmp_path):
    location = sources[1].location
    current = load_manifest(location)
    legacy = json.loads(open(os.path.join(location, MANIFEST_FILE)).read())
    table = legacy.pop("shards")
    legacy["shards"] = [{"name": n, "split": sp, "samples": k, "documents": d, "sha256": h, "bytes": b,
                         "sample_tokens": load_manifest(location).shards[i].sample_tokens}
                        for i, (n, sp, k, d, h, b) in enumerate(zip(table["name"], table["split"], table["samples"],
                                                                    table["documents"], table["sha256"], table["bytes"]))]
    legacy.update(version=1)
    legacy.pop("parts")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(legacy, indent=1))
    old = load_manifest(str(tmp_path))
    assert old.fingerprint == current.fingerprint and old.shards == current.shards

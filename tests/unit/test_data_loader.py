"""StreamingLoader: content, exactly-once resume across data-parallel sizes, peers, bad shards."""

import os
import shutil

import numpy as np
import pytest
import torch
import webdataset

from data_pipeline.info import count_windows
from data_pipeline.loader import StreamingLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shards import read_shard
from data_pipeline.sources import stdlib_root
from pretrain.errors import UserError

SEQ, NF, MB, GLOBAL = 256, 3, 2, 24  # 24 = 2 x 12 = 2 x 2 x 6 = 2 x 4 x 3: dp 1, 2 and 4 all fit


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("loader") / "data"
    prepare(PrepareConfig(out=str(out), sources=[os.path.join(stdlib_root(), "email")], include=["*.py"],
                          shard_tokens=40_000, sample_tokens=12_000, val_fraction=0.1, workers=1))
    return str(out)


def _loaders(data, dp_size, state=None, **kw) -> list[StreamingLoader]:
    settings = dict(seq_len=SEQ, n_future=NF, micro_batch_size=MB, global_batch_size=GLOBAL, block_shards=3)
    settings.update(kw)
    loaders = [StreamingLoader(data, "train", dp_rank=r, dp_size=dp_size, **settings) for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    return loaders


def _run(data, steps, dp_size, state=None, **kw) -> tuple[list[list[int]], dict]:
    """Global batches (sample ids, rank 0's slice first) of `steps` optimizer steps, and the cursor after."""
    loaders = _loaders(data, dp_size, state, **kw)
    iterators = [iter(loader) for loader in loaders]
    batches = []
    for _ in range(steps):
        ids = []
        for loader, it in zip(loaders, iterators):
            for _ in range(loader.micro_batches_per_step):
                ids += next(it)["sample_ids"].tolist()
        batches.append(ids)
    states = [loader.state_dict() for loader in loaders]
    for it in iterators:
        it.close()
    assert all(s == states[0] for s in states)
    return batches, states[0]


def _shard_streams(data) -> tuple[list[np.ndarray], np.ndarray]:
    manifest = load_manifest(data)
    streams = [read_shard(data, s, manifest.dtype) for s in manifest.split_shards("train")]
    counts = [(len(s) - NF) // SEQ for s in streams]
    return streams, np.concatenate([[0], np.cumsum(counts)])


def test_batches_hold_the_windows_their_ids_name(data):
    streams, first_id = _shard_streams(data)
    loader = _loaders(data, 1)[0]
    assert loader.windows_per_epoch == first_id[-1] == count_windows(data, "train", SEQ, NF)
    it = iter(loader)
    for _ in range(30):
        batch = next(it)
        assert batch["input_ids"].shape == (MB, SEQ) and batch["labels"].shape == (MB, NF, SEQ)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        for row, window_id in enumerate(batch["sample_ids"].tolist()):
            shard = int(np.searchsorted(first_id, window_id, side="right")) - 1
            start = (window_id - first_id[shard]) * SEQ
            window = torch.from_numpy(streams[shard][start : start + SEQ + NF].astype(np.int64))
            assert torch.equal(batch["input_ids"][row], window[:SEQ])
            for k in range(1, NF + 1):
                assert torch.equal(batch["labels"][row, k - 1], window[k : k + SEQ])
    it.close()


def test_resume_across_dp_sizes_matches_one_uninterrupted_run(data):
    windows = _loaders(data, 1)[0].windows_per_epoch
    total_steps = windows // GLOBAL + 12  # crosses into the second epoch
    reference, end_state = _run(data, total_steps, dp_size=1)
    first, state = _run(data, 20, dp_size=2)
    second, state = _run(data, 25, dp_size=1, state=state)
    third, state = _run(data, total_steps - 45, dp_size=4, state=state)
    assert first + second + third == reference  # same samples, same order, step by step
    assert state == end_state and state["epoch"] == 1
    flat = [i for batch in reference for i in batch]
    assert sorted(flat[:windows]) == list(range(windows))  # epoch 0: every window exactly once
    assert flat[windows:] != flat[: len(flat) - windows]  # epoch 1 reshuffled


def test_data_parallel_ranks_split_the_global_batch_contiguously(data):
    (whole,), _ = _run(data, 1, dp_size=1)
    per_rank = []
    for loader in _loaders(data, 4):
        it = iter(loader)
        per_rank.append([i for _ in range(loader.micro_batches_per_step) for i in next(it)["sample_ids"].tolist()])
        it.close()
    assert [len(r) for r in per_rank] == [GLOBAL // 4] * 4
    assert sum(per_rank, []) == whole


def test_tensor_parallel_peers_get_identical_batches(data):
    peers = [_loaders(data, 2)[1], _loaders(data, 2)[1]]  # same dp_rank, e.g. tp ranks 0 and 1
    a, b = iter(peers[0]), iter(peers[1])
    for _ in range(10):
        x, y = next(a), next(b)
        assert all(torch.equal(x[key], y[key]) for key in x)
    a.close()
    b.close()


def test_worker_count_does_not_change_the_order(data):
    runs = [_run(data, 8, dp_size=2, num_workers=n)[0] for n in (0, 1, 3)]
    assert runs[0] == runs[1] == runs[2]


def test_state_taken_mid_step_replays_that_step(data):
    loader = _loaders(data, 1, global_batch_size=8)[0]  # 4 micro-batches per step
    it = iter(loader)
    seen = [next(it)["sample_ids"].tolist() for _ in range(6)]  # step 0 and half of step 1
    assert loader.state_dict()["consumed_samples"] == 8
    it.close()
    resumed = _loaders(data, 1, state=loader.state_dict(), global_batch_size=8)[0]
    it = iter(resumed)
    assert next(it)["sample_ids"].tolist() == seen[4]
    it.close()


def test_cursor_from_another_order_is_refused(data):
    _, state = _run(data, 2, dp_size=1)
    for key, value in (("seq_len", 128), ("seed", 1)):
        loader = _loaders(data, 1, **{key: value})[0]
        with pytest.raises(UserError, match=key):
            loader.load_state_dict(state)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(global_batch_size=7), "multiple of micro_batch_size"),
        (dict(seq_len=1_000_000), "too small"),
        (dict(on_bad_shard="ignore"), "on_bad_shard"),
    ],
)
def test_bad_loader_settings_are_user_errors(data, kw, message):
    with pytest.raises(UserError, match=message):
        _loaders(data, 1, **kw)


def test_unknown_split_is_a_user_error(data):
    with pytest.raises(UserError, match="no 'test' shards"):
        StreamingLoader(data, "test", SEQ, NF, MB, GLOBAL)


def _damaged_copy(data, tmp_path, how: str) -> tuple[str, str]:
    copy = str(tmp_path / "copy")
    shutil.copytree(data, copy)
    name = load_manifest(copy).split_shards("train")[1].name
    path = os.path.join(copy, name)
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    else:
        os.remove(path)
    return copy, name


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_bad_shard_stops_training_with_its_name(data, tmp_path, how):
    copy, name = _damaged_copy(data, tmp_path, how)
    it = iter(_loaders(copy, 1, block_shards=100)[0])
    with pytest.raises(UserError, match=rf"{name}.*mtp data verify.*on_bad_shard=skip"):
        next(it)


def test_skip_mode_skips_counts_and_logs_the_bad_shard(data, tmp_path, caplog):
    copy, name = _damaged_copy(data, tmp_path, "flip")
    _, first_id = _shard_streams(data)
    loader = _loaders(copy, 1, block_shards=100, on_bad_shard="skip")[0]
    it = iter(loader)
    ids = [i for _ in range(loader.windows_per_epoch // MB) for i in next(it)["sample_ids"].tolist()]
    it.close()
    assert loader.skipped_shards == {name}
    assert name in caplog.text
    assert len(ids) == loader.windows_per_epoch // MB * MB  # batches keep their shape
    assert not any(first_id[1] <= i < first_id[2] for i in ids)  # nothing from shard 1


def test_skip_mode_warns_once_per_shard_across_epochs(data, tmp_path, caplog):
    copy, name = _damaged_copy(data, tmp_path, "delete")
    loader = _loaders(copy, 1, block_shards=100, on_bad_shard="skip")[0]
    it = iter(loader)
    for _ in range(3 * loader.windows_per_epoch // MB):  # three epochs meet the shard three times
        next(it)
    it.close()
    assert loader.epoch >= 2
    assert loader.skipped_shards == {name}
    assert caplog.text.count("skipping bad shard") == 1


def test_skip_mode_still_stops_when_a_block_has_no_good_shard(data, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(data, copy)
    for shard in load_manifest(copy).split_shards("val"):
        os.remove(os.path.join(copy, shard.name))
    loader = StreamingLoader(copy, "val", 64, NF, MB, GLOBAL, on_bad_shard="skip", block_shards=100)
    with pytest.raises(UserError, match="every shard of a block is unreadable"):
        next(iter(loader))


def test_shards_are_plain_webdataset_also_through_pipe_urls(data):
    manifest = load_manifest(data)
    shard = manifest.split_shards("train")[0]
    path = os.path.join(data, shard.name)
    for url in (path, f"pipe:cat {path}"):
        samples = list(webdataset.WebDataset([url], shardshuffle=False).decode())
        assert [len(s["tokens.npy"]) for s in samples] == shard.sample_tokens
        stream = np.concatenate([s["tokens.npy"] for s in samples])
        assert np.array_equal(stream, read_shard(data, shard, manifest.dtype))


def test_loader_reads_through_a_pipe_url_prefix(data):
    local, _ = _run(data, 5, dp_size=1)
    piped, _ = _run(f"pipe:cat {data}", 5, dp_size=1)
    templated, _ = _run("pipe:cat " + os.path.join(data, "{name}"), 5, dp_size=1)
    assert local == piped == templated

"""Checkpoint store: atomic commit, verification on resume, pruning, RNG round trip."""

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import COMPLETE, CheckpointStore, load_rng_state, save_rng_state
from pretrain.errors import UserError

CPU = torch.device("cpu")


def save(store: CheckpointStore, step: int, payload: bytes = b"weights") -> str:
    """What the trainer does: engine files into the temp dir, then commit."""
    tmp = Path(store.begin(step))
    (tmp / "engine").mkdir()
    (tmp / "engine" / "model_states.pt").write_bytes(payload * 1000)
    (tmp / "latest").write_text("engine")
    return store.commit(str(tmp), step, {"cursor": step * 8, "mlflow_run_id": "abc"})


def test_commit_latest_and_prune(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    assert store.latest() is None and store.list() == []
    for step in (10, 20, 30):
        save(store, step)
    assert [Path(p).name for p in store.list()] == ["step_000020", "step_000030"]
    path, extra = store.latest()
    assert Path(path).name == "step_000030"
    assert extra == {"cursor": 240, "mlflow_run_id": "abc", "step": 30}
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"engine/model_states.pt", "latest", "extra.json"}
    assert manifest["files"]["engine/model_states.pt"]["size"] == 7000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_truncated_file_falls_back_to_previous_with_warning(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    newest = save(store, 20)
    states = Path(newest) / "engine" / "model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        path, extra = store.latest()
    assert Path(path).name == "step_000010" and extra["step"] == 10
    assert "step_000020" in caplog.text and "engine/model_states.pt has 100 bytes" in caplog.text


def test_flipped_byte_same_size_is_caught_by_hash(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    newest = Path(save(store, 20)) / "engine" / "model_states.pt"
    data = bytearray(newest.read_bytes())
    data[3] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert Path(store.latest()[0]).name == "step_000010"
    assert "does not match its sha256" in caplog.text


def test_missing_marker_or_file_is_skipped(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=5)
    save(store, 10)
    (Path(save(store, 20)) / "latest").unlink()
    os.remove(Path(save(store, 30)) / COMPLETE)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert Path(store.latest()[0]).name == "step_000010"
    assert "step_000030: no COMPLETE marker" in caplog.text
    assert "step_000020: latest is missing" in caplog.text
    assert [Path(p).name for p in store.list()] == ["step_000010", "step_000020"]


def test_writer_killed_mid_checkpoint_leaves_previous_usable(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    # A real process dies by SIGKILL halfway through writing step 20.
    child = textwrap.dedent(f"""
        import os, signal
        from pretrain.checkpoint import CheckpointStore
        tmp = CheckpointStore({str(tmp_path)!r}, keep=3).begin(20)
        with open(os.path.join(tmp, "model_states.pt"), "wb") as f:
            f.write(b"half")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", child])
    assert result.returncode == -9
    assert (tmp_path / ".tmp-step_000020" / "model_states.pt").exists()
    path, extra = store.latest()
    assert Path(path).name == "step_000010" and extra["step"] == 10
    assert [Path(p).name for p in store.list()] == ["step_000010"]
    save(store, 20)
    assert not (tmp_path / ".tmp-step_000020").exists()
    assert Path(store.latest()[0]).name == "step_000020"


def test_begin_removes_stale_temps_and_returns_empty_dir(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=1)
    stale = tmp_path / ".tmp-step_000005"
    stale.mkdir()
    (stale / "junk").write_text("x")
    tmp = store.begin(5)
    assert tmp == store.tmp_dir(5) and os.listdir(tmp) == []


def test_keep_one_never_deletes_the_only_good_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=1)
    for step in (1, 2, 3):
        save(store, step)
    assert [Path(p).name for p in store.list()] == ["step_000003"]
    assert store.latest()[1]["step"] == 3


def test_resuming_from_older_step_drops_abandoned_newer_checkpoints(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=5)
    for step in (10, 20, 30):
        save(store, step)
    # The run went back to step 20 (say 30 was damaged) and checkpoints 25 on the new timeline.
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        save(store, 25)
    assert [Path(p).name for p in store.list()] == ["step_000010", "step_000020", "step_000025"]
    assert "step_000030" in caplog.text


def test_recommitting_a_step_replaces_it(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10, payload=b"old")
    save(store, 10, payload=b"new")
    path, _ = store.latest()
    assert (Path(path) / "engine" / "model_states.pt").read_bytes() == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010"]


def test_commit_without_begin_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        CheckpointStore(str(tmp_path), keep=1).commit(str(tmp_path / "nowhere"), 1, {})


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="checkpoint.keep"):
        CheckpointStore(str(tmp_path), keep=0)


def draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()
    save_rng_state(str(tmp_path), rank=1, device=CPU)
    expected = [draw() for _ in range(3)]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng_state(str(tmp_path), rank=1, device=CPU)
    assert [draw() for _ in range(3)] == expected


def test_rng_state_absent_for_new_rank(tmp_path, caplog):
    save_rng_state(str(tmp_path), rank=0, device=CPU)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert not load_rng_state(str(tmp_path), rank=3, device=CPU)
    assert "no RNG state for rank 3" in caplog.text
    assert torch.equal(before, torch.get_rng_state())


def test_rng_files_are_part_of_the_manifest(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=1)
    tmp = store.begin(7)
    save_rng_state(tmp, rank=0, device=CPU)
    path = store.commit(tmp, 7, {})
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert "rng/rank_00000.pt" in manifest["files"]
    assert load_rng_state(path, rank=0, device=CPU)

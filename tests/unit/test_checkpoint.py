"""Checkpoint store: sealing from per-rank digests, verification, keep-K pruning, setting aside, RNG round trip."""

import hashlib
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

from pretrain.checkpoint import (
    COMPLETE,
    CheckpointStore,
    assign,
    check_metadata,
    load_rng_state,
    rng_state_file,
    verify,
)
from pretrain.ckpt_writer import PendingFile, write_files
from pretrain.errors import UserError

CPU = torch.device("cpu")


def save(store: CheckpointStore, step: int, payload: bytes = b"weights", ranks: int = 2) -> str:
    """What the trainer does: every rank writes its files (checksummed), rank 0 adds extra.json and seals."""
    tmp = store.begin(step)
    records = []
    for rank in range(ranks):
        files = [PendingFile(os.path.join(tmp, "engine", f"rank{rank}_states.pt"), data=payload * 1000),
                 PendingFile(os.path.join(tmp, "engine", f"rank{rank}_tensors.pt"), state={"w": torch.arange(10.0)})]
        result = write_files(files, tmp, rank)
        assert result.error is None
        records += result.records
    (Path(tmp) / "latest").write_text("engine")  # a file no rank reported: rank 0 checksums it when sealing
    store.write_extra(tmp, step, {"cursor": step * 8, "mlflow_run_id": "abc"})
    return store.seal(tmp, step, records)


def names(paths) -> list[str]:
    return [Path(p).name for p in paths]


def flip_byte(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_seal_records_every_rank_and_latest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    assert store.latest() is None and store.list() == []
    for step in (10, 20, 30):
        save(store, step)
    assert names(store.list()) == ["step_000020", "step_000030"]
    path, extra = store.latest()
    assert Path(path).name == "step_000030"
    assert extra == {"cursor": 240, "mlflow_run_id": "abc", "step": 30}
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["checksum"] == "xxh3_128" and manifest["format"] == 2
    files = manifest["files"]
    assert {files[f"engine/rank{r}_states.pt"]["rank"] for r in (0, 1)} == {0, 1}
    assert files["engine/rank1_states.pt"]["size"] == 7000 and {"latest", "extra.json"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_digest_written_while_writing_equals_the_file_on_disk(tmp_path):
    import xxhash

    result = write_files([PendingFile(str(tmp_path / "a.pt"), state={"x": torch.randn(1000)})], str(tmp_path), 3)
    (record,) = result.records
    assert record.rel == "a.pt" and record.rank == 3 and record.size == (tmp_path / "a.pt").stat().st_size
    assert record.digest == xxhash.xxh3_128((tmp_path / "a.pt").read_bytes()).hexdigest()


def test_truncated_file_falls_back_to_previous_with_warning(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    states = Path(save(store, 20)) / "engine" / "rank1_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        path, extra = store.latest()
    assert Path(path).name == "step_000010" and extra["step"] == 10
    assert "step_000020" in caplog.text and "engine/rank1_states.pt has 100 bytes, manifest says 7000" in caplog.text


def test_flipped_byte_same_size_is_caught_by_the_checksum(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    flip_byte(Path(save(store, 20)) / "engine" / "rank0_tensors.pt", offset=200)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert Path(store.latest()[0]).name == "step_000010"
    assert "engine/rank0_tensors.pt does not match its xxh3_128" in caplog.text


def test_verify_names_every_bad_file(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    path = Path(save(store, 10))
    (path / "engine" / "rank0_states.pt").write_bytes(b"short")
    flip_byte(path / "engine" / "rank1_states.pt")
    (path / "latest").unlink()
    problems = verify(path)
    assert problems == [
        "engine/rank0_states.pt has 5 bytes, manifest says 7000",
        "engine/rank1_states.pt does not match its xxh3_128 in the manifest",
        "latest is missing",
    ]


def test_a_lost_marker_with_intact_files_is_reported_as_such(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    path = Path(save(store, 10))
    (path / COMPLETE).unlink()
    (problem,) = verify(path)
    assert "only its COMPLETE marker is missing, every file matches its manifest" in problem
    assert f"echo 10 > {path / COMPLETE}" in problem
    flip_byte(path / "engine" / "rank1_states.pt")
    assert verify(path) == ["no COMPLETE marker", "engine/rank1_states.pt does not match its xxh3_128 in the manifest"]


def test_sha256_manifests_of_older_checkpoints_still_verify(tmp_path):
    """Format 1: rank 0 hashed every file with sha256 and recorded no writer."""
    step = tmp_path / "step_000004"
    (step / "engine").mkdir(parents=True)
    (step / "engine" / "model.pt").write_bytes(b"old weights" * 100)
    (step / "extra.json").write_text(json.dumps({"step": 4}))
    files = {rel: {"sha256": hashlib.sha256((step / rel).read_bytes()).hexdigest(), "size": (step / rel).stat().st_size}
             for rel in ("engine/model.pt", "extra.json")}
    (step / "manifest.json").write_text(json.dumps({"step": 4, "files": files}))
    (step / COMPLETE).write_text("4\n")
    assert verify(step) == []
    flip_byte(step / "engine" / "model.pt")
    assert verify(step) == ["engine/model.pt does not match its sha256 in the manifest"]


def test_assign_checks_each_file_once_by_its_writer_or_spread_by_size():
    files = {"a": {"size": 10, "rank": 0}, "b": {"size": 50, "rank": 1}, "c": {"size": 30, "rank": 3},
             "d": {"size": 40}, "e": {"size": 5, "rank": 1}}
    assert assign(files, 4) == [["a"], ["b", "e"], ["d"], ["c"]]  # d: no writer recorded, the idle rank
    two = assign(files, 2)  # c's writer and d's are gone: the lighter rank takes the larger first
    assert sorted(two[0] + two[1]) == ["a", "b", "c", "d", "e"] and two == [["a", "d", "c"], ["b", "e"]]


def test_missing_marker_or_file_is_skipped(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep=5)
    save(store, 10)
    (Path(save(store, 20)) / "latest").unlink()
    os.remove(Path(save(store, 30)) / COMPLETE)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert Path(store.latest()[0]).name == "step_000010"
    assert "step_000030: only its COMPLETE marker is missing" in caplog.text
    assert "step_000020: latest is missing" in caplog.text
    assert names(store.list()) == ["step_000010", "step_000020"]


def test_survey_reads_metadata_only(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=5)
    save(store, 10)
    flip_byte(Path(save(store, 20)) / "engine" / "rank0_states.pt")  # same size: metadata cannot see it
    (Path(store.root) / "step_000020" / "extra.json").write_text("{not json")
    surveys = store.survey()
    assert [s.step for s in surveys] == [20, 10]
    assert "unreadable manifest.json or extra.json" in surveys[0].problem
    assert surveys[1].problem is None and surveys[1].sealed and surveys[1].nbytes > 14000
    assert check_metadata(Path(store.root) / "step_000010").files == surveys[1].files


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
    assert names(store.list()) == ["step_000010"]
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
    assert names(store.list()) == ["step_000003"]
    assert store.latest()[1]["step"] == 3


def test_newer_checkpoints_than_the_one_sealed_are_never_deleted(tmp_path):
    """A run that fell back from 30 to 20 and seals 25 leaves 30 alone: only keep-K deletes, and only older ones."""
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (10, 20, 30):
        save(store, step)
    assert names(store.list()) == ["step_000020", "step_000030"]
    save(store, 25)
    assert names(store.list()) == ["step_000020", "step_000025", "step_000030"]
    save(store, 27)
    assert names(store.list()) == ["step_000025", "step_000027", "step_000030"]


def test_unsealed_dirs_between_kept_checkpoints_stay(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10)
    os.remove(Path(save(store, 20)) / COMPLETE)  # lost its marker: may be restorable
    save(store, 30)
    save(store, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010", "step_000020", "step_000030", "step_000040"]
    save(store, 50)  # now older than the newest three sealed ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000030", "step_000040", "step_000050"]


def test_resealing_a_step_moves_the_earlier_one_aside(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    save(store, 10, payload=b"old")
    save(store, 10, payload=b"new")
    path, _ = store.latest()
    assert (Path(path) / "engine" / "rank0_states.pt").read_bytes() == b"new" * 1000
    (aside,) = (tmp_path / "set-aside").iterdir()
    assert aside.name.startswith("step_000010.replaced-")
    assert (aside / "engine" / "rank0_states.pt").read_bytes() == b"old" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set-aside", "step_000010"]


def test_set_aside_moves_every_checkpoint_and_deletes_nothing(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    for step in (1, 2):
        save(store, step)
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    target = store.set_aside()
    assert store.list() == [] and store.survey() == [] and target.parent == tmp_path / "set-aside"
    after = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert store.set_aside() is None


def test_seal_refuses_a_file_whose_size_differs_from_its_writers_report(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    tmp = store.begin(3)
    result = write_files([PendingFile(os.path.join(tmp, "a.bin"), data=b"x" * 100)], tmp, 1)
    Path(tmp, "a.bin").write_bytes(b"x" * 50)
    with pytest.raises(OSError, match="a.bin has 50 bytes on disk but its writer \\(rank 1\\) reported 100"):
        store.seal(tmp, 3, result.records)
    assert store.list() == []


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="checkpoint.keep"):
        CheckpointStore(str(tmp_path), keep=0)


def draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def write_rng(directory: str, rank: int) -> None:
    assert write_files([rng_state_file(directory, rank, CPU)], directory, rank).error is None


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()
    write_rng(str(tmp_path), rank=1)
    expected = [draw() for _ in range(3)]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng_state(str(tmp_path), rank=1, device=CPU)
    assert [draw() for _ in range(3)] == expected


def test_rng_state_absent_for_new_rank(tmp_path, caplog):
    write_rng(str(tmp_path), rank=0)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert not load_rng_state(str(tmp_path), rank=3, device=CPU)
    assert "no RNG state for rank 3" in caplog.text
    assert torch.equal(before, torch.get_rng_state())

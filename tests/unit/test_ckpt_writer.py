"""One rank's checkpoint files: written with checksums, host copies for background writes, write errors reported."""

import collections
import errno
import io
import os
import threading
from pathlib import Path

import torch

from pretrain.ckpt_writer import BackgroundWriter, PendingFile, make_stager, stage, write_files
from tests.tmpfs import small_tmpfs

Address = collections.namedtuple("Address", "numel start")  # as DeepSpeed's fragment_address


def test_host_copy_does_not_change_with_training_and_keeps_the_state_shape(tmp_path):
    flat = torch.arange(12.0)
    state = {"module": {"a": flat[:6].view(2, 3), "b": flat[6:]}, "mappings": {"a": Address(6, 0)}, "step": 3}
    (staged,) = stage(make_stager(pinned=False), [PendingFile(str(tmp_path / "s.pt"), state=state)])
    flat.mul_(-1)  # the optimizer step after the save
    copy = staged.state
    assert torch.equal(copy["module"]["a"], torch.arange(6.0).view(2, 3)) and copy["module"]["b"][0] == 6.0
    assert copy["module"]["a"].untyped_storage().data_ptr() == copy["module"]["b"].untyped_storage().data_ptr()
    assert copy["mappings"]["a"].start == 0 and isinstance(copy["mappings"]["a"], Address) and copy["step"] == 3
    write_files([staged], str(tmp_path), 0)
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert torch.equal(loaded["module"]["b"], torch.arange(6.0, 12.0)) and loaded["mappings"]["a"].numel == 6


class FullAfter(io.FileIO):
    """A file on a disk that fills up after 1000 bytes: write() raises ENOSPC as the kernel's would."""

    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_write_error_is_reported_not_raised(tmp_path, monkeypatch):
    """ENOSPC from the write itself, mid-file: torch.save wraps it in its own RuntimeError; ours is reported."""
    monkeypatch.setattr("pretrain.ckpt_writer.open", lambda path, mode, buffering: FullAfter(path, mode),
                        raising=False)
    files = [PendingFile(str(tmp_path / "small.bin"), data=b"x" * 10),
             PendingFile(str(tmp_path / "engine" / "big.pt"), state={"w": torch.zeros(10_000)})]
    result = write_files(files, str(tmp_path), 1)
    assert result.error == f"no space left on device ({tmp_path / 'engine' / 'big.pt'})"
    assert [r.rel for r in result.records] == ["small.bin"] and result.rank == 1


def test_an_injected_failure_stops_before_writing(tmp_path):
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    result = write_files([PendingFile(str(tmp_path / "a.bin"), data=b"x")], str(tmp_path), 0, fail=err)
    assert result.error == f"no space left on device ({tmp_path / 'a.bin'})" and not (tmp_path / "a.bin").exists()


def test_a_full_file_system_is_reported_with_the_file(tmp_path):
    with small_tmpfs(tmp_path, 1 << 20) as disk:
        files = [PendingFile(str(disk / "engine" / "states.pt"), state={"w": torch.zeros(1 << 20)})]  # 4 MiB
        result = write_files(files, str(disk), 0)
    assert result.error == f"no space left on device ({disk / 'engine' / 'states.pt'})"
    assert result.records == []


def test_background_writer_reports_and_can_be_held_until_waited_for(tmp_path):
    started = threading.Event()

    def write(wanted):
        started.set()
        wanted.wait(60)  # the slow-save drill's hold
        return write_files([PendingFile(str(tmp_path / "a.bin"), data=b"abc")], str(tmp_path), 0)

    writer = BackgroundWriter(write)
    assert started.wait(60) and not writer.done()
    result = writer.wait(60)
    assert writer.done() and result.records[0].size == 3 and Path(tmp_path / "a.bin").read_bytes() == b"abc"


def test_save_faults_strike_their_rank_and_step_only(monkeypatch):
    from pretrain.faults import FaultInjector, parse

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    full = FaultInjector([parse("enospc-in-save@4:1")], rank=1)
    assert full.save_error(3) is None and FaultInjector([parse("enospc-in-save@4:1")], rank=0).save_error(4) is None
    assert full.save_error(4).errno == errno.ENOSPC
    released = threading.Event()
    released.set()
    FaultInjector([parse("slow-save@2")], rank=0).hold_save(2, released)  # returns once the trainer waits
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert full.save_error(4) is None  # the restarted group is not struck again

"""DeepSpeed's checkpoint files, taken from its `save_checkpoint` instead of written by it.

DeepSpeed's `save_checkpoint` decides which files this rank writes and what
each holds, and hands every one to its `CheckpointEngine.save(state, path)`.
`CapturingEngine` is a CheckpointEngine that records those (state, path)
pairs and writes nothing, so `pretrain.ckpt_writer` can write them (now, or
from host copies in the background) with checksums and fsync, outside
DeepSpeed's own collectives: `save_checkpoint` then never waits on I/O
under the short step-collective timeout, and an I/O error on one rank is
reported in our protocol instead of raised between DeepSpeed's barriers
(where the other ranks would wait for it until they time out).

Why not DeepSpeed's own engines (0.19.8): TorchCheckpointEngine writes
synchronously inside `save_checkpoint`; FastCheckpointEngine needs the
async_io op (libaio) or GPUDirect Storage and is synchronous too;
DecoupledCheckpointEngine hands the live tensors to a writer process
through a multiprocessing queue (shared memory / CUDA IPC, no copy), so the
optimizer steps that follow change what is being written, and its commit
is a world barrier with a fixed 300 s timeout that reports no per-file
result. The file format stays DeepSpeed's: `torch.save` of the very objects
DeepSpeed would save, so its loader and `parallel.reshard` read them.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from pretrain.ckpt_writer import PendingFile


class CapturingEngine(CheckpointEngine):
    """Records the files of one `save_checkpoint`; creates no directory (the writer does, and reports errors)."""

    def __init__(self):
        super().__init__()
        self.name = "mtp-capture"
        self.files: list[PendingFile] = []

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.files.append(PendingFile(str(path), state=state_dict))

    def load(self, path: str, map_location=None):
        raise RuntimeError("CapturingEngine only saves; loading goes through DeepSpeed's own engine")

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True


def capture_checkpoint(engine, directory: str, tag: str) -> CapturingEngine:
    """Run DeepSpeed's `save_checkpoint` with a CapturingEngine: every file it would write, unwritten.

    The `latest` tag file is not wanted (the trainer loads by tag); the ZeRO
    recovery scripts DeepSpeed copies into the checkpoint on rank 0 become
    pending files like the rest.
    """
    capture = CapturingEngine()
    original_engine = engine.checkpoint_engine

    def copy_recovery_script(save_path: str) -> None:
        import deepspeed

        utils = Path(deepspeed.__file__).parent / "utils"
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            if (utils / script).is_file():
                capture.files.append(PendingFile(os.path.join(save_path, script), data=(utils / script).read_bytes()))

    engine.checkpoint_engine, engine._copy_recovery_script = capture, copy_recovery_script
    try:
        engine.save_checkpoint(directory, tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = original_engine
        del engine._copy_recovery_script  # the class's method again
    return capture

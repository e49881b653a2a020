"""Graceful stop on the signals a cluster sends before it takes the job away.

SLURM sends SIGUSR1 (with `--signal`) or SIGTERM ahead of a time limit or a
preemption. The handler only raises a flag; the trainer finishes the step
in flight, checkpoints and exits 0, so the requeued job resumes losing
nothing.

A stop may come at any moment, so the handlers are installed first thing
(`install`, before torch is imported) and the flag is read at every point
where stopping is cheap: after start-up, after a resume, after every step and
after every checkpoint. Under SLURM the batch script also leaves a stop file
(`MTP_STOP_FILE`) and holds the signal until rank 0 has written
`MTP_READY_FILE` (every rank is up, with its handlers): see slurm/train.sbatch.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # the stop signals this process got, in order


def _handle(signum, _frame) -> None:
    _received.append(signum)


def install() -> None:
    """Catch SIGTERM and SIGUSR1 from now on; the first statement of `mtp train`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


def received() -> int | None:
    """The first stop signal this process got, if any."""
    return _received[0] if _received else None


def announce_ready() -> None:
    """Rank 0, once every rank is up: take a stop the batch script recorded, then tell it training is ready.

    The order matters: a stop recorded before the ready file exists was held
    by the script and is picked up here; one recorded after it is delivered
    as a signal.
    """
    stop_file, ready_file = os.environ.get("MTP_STOP_FILE"), os.environ.get("MTP_READY_FILE")
    if stop_file and Path(stop_file).exists() and not _received:
        _received.append(signal.SIGUSR1)
    if ready_file:
        Path(ready_file).parent.mkdir(parents=True, exist_ok=True)
        Path(ready_file).write_text(f"{os.getpid()}\n")


class StopFlag:
    """The stop signal, agreed on by every rank over `group` (a CPU/gloo group); also a lost run-dir lock.

    `run_lock` is rank 0's `RunLock` (None elsewhere): if another trainer
    took the run directory over, every rank stops at the same step, without
    writing anything more.
    """

    def __init__(self, group=None, run_lock=None):
        self.group = group
        self.run_lock = run_lock
        install()

    @property
    def received(self) -> int | None:
        return received()

    def settle(self) -> None:
        """Ignore SIGUSR1 from now on: the work is checkpointed and the process is exiting.

        Python puts its own handlers back to the default action at shutdown,
        and USR1's default kills the process; torchrun would then restart a
        run that had already finished. SIG_IGN survives shutdown.
        """
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a stop signal.

        One tiny all-reduce per step: ranks must stop after the same step or
        the checkpoint's collectives would hang. It runs on a host (gloo)
        group, so it never waits for the GPU's queue.
        """
        import torch
        import torch.distributed as dist

        lost = self.run_lock is not None and self.run_lock.lost is not None
        flag = torch.tensor([1.0 if received() else 0.0, 1.0 if lost else 0.0])
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag[1].item():
            from pretrain.errors import RunFailure

            why = self.run_lock.lost if self.run_lock is not None else "rank 0 lost it"
            raise RunFailure(f"the run-directory lock was taken away ({why}); another trainer uses this run "
                             "directory, so this one stops without writing anything more")
        return bool(flag[0].item())

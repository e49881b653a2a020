"""Graceful stop on the signals a cluster sends before it takes the job away.

SLURM sends SIGUSR1 (with `--signal`) or SIGTERM ahead of a time limit or a
preemption. The handler only raises a flag; the trainer finishes the step
in flight, checkpoints and exits 0, so the requeued job resumes losing
nothing.
"""

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """The stop signal this process got, agreed on by every rank over `group` (a CPU/gloo group)."""

    def __init__(self, group=None):
        self.group = group
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

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
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

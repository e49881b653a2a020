"""The collectives of saving and resuming, on a gloo group of their own with `checkpoint.timeout_s`.

A save or a resume waits for the slowest rank's files, which at 7B-13B
scale takes minutes: far longer than a training step's collectives may
wait before a hung peer must be reported (`fault.collective_timeout_s`).
So the few collectives that wait on file I/O run here, with their own
timeout; one that is hit ends the run with a line that says how big the
checkpoint is and what timeout it would need.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pretrain.errors import RunFailure

SLOW_RANK_BYTES_PER_S = 50e6  # the slow file system a suggested timeout is sized for, per rank


class CheckpointGroup:
    """Gather, broadcast and agree across ranks for checkpoints; nothing at all in a one-process run."""

    def __init__(self, timeout_s: int, rank: int, world: int, poll_group=None):
        self.timeout_s, self.rank, self.world = timeout_s, rank, world
        self.poll_group = poll_group  # the runtime's host (gloo) group, short timeout: for per-step polls
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world > 1 else None

    def _ready(self) -> None:
        """Put this group's timeout back: `parallel.engine.apply_collective_timeout` sets every group's.

        torch has no public setter for an existing group; this is the one
        engine.py uses.
        """
        from torch.distributed import distributed_c10d as c10d

        c10d._set_pg_timeout(timedelta(seconds=self.timeout_s), self.group)

    def gather(self, obj: Any, what: str, nbytes: tuple[int, int]) -> list[Any]:
        """Every rank's `obj`, on every rank. `nbytes`: (checkpoint, this rank's share) for a timeout's message."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        self._run(lambda: dist.all_gather_object(out, obj, group=self.group), what, nbytes)
        return out

    def broadcast(self, obj: Any, what: str, nbytes: tuple[int, int] = (0, 0)) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        self._run(lambda: dist.broadcast_object_list(box, src=0, group=self.group), what, nbytes)
        return box[0]

    def all_done(self, done: bool) -> bool:
        """True on every rank when `done` is true on every rank: one tiny all-reduce on the host group."""
        if self.group is None:
            return done
        flag = torch.tensor([0.0 if done else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.poll_group)
        return flag.item() == 0.0

    def _run(self, collective, what: str, nbytes: tuple[int, int]) -> None:
        self._ready()
        try:
            collective()
        except RuntimeError as err:
            text = str(err).lower()
            if "timed out" in text or "timeout" in text:
                raise RunFailure(timeout_message(self.rank, what, self.timeout_s, *nbytes)) from None
            raise


def timeout_message(rank: int, what: str, timeout_s: int, total: int, mine: int) -> str:
    """What was waited for, how big it is, and the timeout that would fit a slow file system."""
    share = mine or total  # what one rank moves; the whole checkpoint when the share is unknown
    need = share / timeout_s / 1e9
    suggest = max(2 * timeout_s, 60 * math.ceil(share / SLOW_RANK_BYTES_PER_S / 60))
    return (f"rank {rank}: {what} did not finish within checkpoint.timeout_s={timeout_s}s; the checkpoint holds "
            f"{gb(total)} ({gb(mine)} written or read by this rank), which needs {need:.3f} GB/s per rank to "
            f"finish in time. If the file system is that slow, raise checkpoint.timeout_s (e.g. to {suggest}, "
            f"{gb(share)} at {SLOW_RANK_BYTES_PER_S / 1e6:.0f} MB/s); otherwise a peer rank hung or died, and the "
            "launcher restarts the group from the newest complete checkpoint")


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"

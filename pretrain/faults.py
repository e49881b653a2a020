"""Deliberate faults, for reliability drills (`mtp bench faults`) and the tests.

A run with `MTP_FAULT=KIND@STEPS[:RANK]` in its environment breaks itself
while it trains step STEPS (one step `6` or a range `3-4`; RANK defaults to
every rank):

    kill            SIGKILL before the step, as a lost node or an OOM killer would
    stop            SIGUSR1 before the step, as SLURM's `--signal` before a preemption
    hang            sleep before the step, as a wedged GPU or stalled NFS would;
                    the other ranks wait in the step's collectives until
                    `fault.collective_timeout_s` ends them
    kill-in-save    SIGKILL while the checkpoint of that step is being written
                    (its first file on disk, not yet sealed; with checkpoint.async the
                    background writer dies while training goes on)
    slow-save       the checkpoint write of that step does not finish until the trainer
                    has to wait for it (a slow file system: with checkpoint.async the
                    next save, a stop signal or the end of training then waits)
    enospc-in-save  the checkpoint write of that step fails with ENOSPC, as on a full disk
    nan             the step's embeddings become NaN, so its loss and every
                    gradient are NaN

kill, stop, hang and the save faults strike the first attempt only (torchrun's
TORCHELASTIC_RESTART_COUNT=0), so the restarted group shows the recovery;
nan strikes every attempt, like a bad batch would. Nothing happens without
the variable: the hooks cost one comparison each.
"""

import errno
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import torch

KINDS = ("kill", "stop", "hang", "kill-in-save", "slow-save", "enospc-in-save", "nan")
_SPEC = re.compile(r"^(?P<kind>[a-z-]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?::(?P<rank>\d+))?$")
HANG_S = 24 * 3600  # far past any collective timeout; the launcher kills the sleeper


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int  # first step it strikes
    last: int  # last step it strikes
    rank: int | None  # None = every rank

    def strikes(self, kind: str, step: int, rank: int) -> bool:
        if kind != self.kind or not self.first <= step <= self.last:
            return False
        if self.rank is not None and rank != self.rank:
            return False
        return kind == "nan" or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def parse(spec: str) -> Fault:
    """`kill@6:1` -> Fault("kill", 6, 6, 1); a ValueError names what is wrong."""
    match = _SPEC.match(spec.strip())
    if not match or match["kind"] not in KINDS:
        raise ValueError(f"MTP_FAULT={spec!r} is not KIND@STEP[-STEP][:RANK] with KIND one of {', '.join(KINDS)}")
    first = int(match["first"])
    last = int(match["last"] or first)
    if first < 1 or last < first:
        raise ValueError(f"MTP_FAULT={spec!r}: steps count from 1 and a range goes up")
    return Fault(match["kind"], first, last, None if match["rank"] is None else int(match["rank"]))


def from_env() -> Fault | None:
    spec = os.environ.get("MTP_FAULT")
    return parse(spec) if spec else None


class FaultInjector:
    """The trainer's hooks; each does nothing unless the configured fault strikes here and now."""

    def __init__(self, fault: Fault | None, rank: int):
        self.fault = fault
        self.rank = rank

    def before_step(self, step: int) -> None:
        if self._strikes("kill", step):
            _announce(f"killing rank {self.rank} before step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self._strikes("stop", step):
            _announce(f"rank {self.rank} gets SIGUSR1 before step {step}")
            os.kill(os.getpid(), signal.SIGUSR1)
        if self._strikes("hang", step):
            _announce(f"rank {self.rank} hangs before step {step}")
            time.sleep(HANG_S)

    def during_save(self, step: int) -> None:
        if self._strikes("kill-in-save", step):
            _announce(f"killing rank {self.rank} while it writes the checkpoint of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def hold_save(self, step: int, released: threading.Event) -> None:
        """slow-save: block the writer of `step`'s checkpoint until `released` (the trainer waits for it)."""
        if self._strikes("slow-save", step):
            _announce(f"rank {self.rank} holds the checkpoint write of step {step} until the trainer waits for it")
            released.wait(HANG_S)

    def save_error(self, step: int) -> OSError | None:
        """enospc-in-save: the error the first write of `step`'s checkpoint raises instead of writing."""
        if not self._strikes("enospc-in-save", step):
            return None
        _announce(f"rank {self.rank}: the checkpoint write of step {step} fails with ENOSPC")
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def poison(self, model: torch.nn.Module, step_of) -> None:
        """Make the embedding output NaN on the fault's steps (`step_of()` gives the step in flight)."""
        if self.fault is None or self.fault.kind != "nan":
            return
        from pretrain.model.vocab import TokenEmbedding

        def hook(module, _inputs, output: torch.Tensor) -> torch.Tensor:
            poisoned = module.training and self._strikes("nan", step_of())  # evaluation stays clean
            return output * float("nan") if poisoned else output

        for module in model.modules():
            if isinstance(module, TokenEmbedding):
                module.register_forward_hook(hook)

    def _strikes(self, kind: str, step: int) -> bool:
        return self.fault is not None and self.fault.strikes(kind, step, self.rank)


def _announce(line: str) -> None:
    print(f"MTP_FAULT: {line}", flush=True)

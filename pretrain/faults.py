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
    gate            wait before the step until the file MTP_FAULT_GATE exists
                    (`{}` in it stands for the gate's label: the step,
                    `save-STEP`, the moment; or a stop signal arrives), so a test can act at a known
                    moment: a step, or `gate@launch` (before the stop handlers
                    exist), `gate@start` (process group up, model not built),
                    `gate@resume` (checkpoint chosen, not loaded), `gate@end`
                    (after the last step, before the run's outputs close)
    gate-in-save    the same while the checkpoint of that step is being written

Several faults may be given, separated by commas. kill, stop, hang, the
save faults and the gates strike the first attempt only (torchrun's
TORCHELASTIC_RESTART_COUNT=0), so the restarted group shows the recovery;
nan strikes every attempt, like a bad batch would. Nothing happens without
the variable: the hooks cost one comparison each.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KINDS = ("kill", "stop", "hang", "kill-in-save", "slow-save", "enospc-in-save", "nan", "gate", "gate-in-save")
MOMENTS = ("launch", "start", "resume", "end")  # the gate's moments that are not steps
_SPEC = re.compile(r"^(?P<kind>[a-z-]+)@(?:(?P<moment>[a-z]+)|(?P<first>\d+)(?:-(?P<last>\d+))?)(?::(?P<rank>\d+))?$")
HANG_S = 24 * 3600  # far past any collective timeout; the launcher kills the sleeper
GATE_POLL_S = 0.1


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int  # first step it strikes
    last: int  # last step it strikes
    rank: int | None  # None = every rank
    moment: str | None = None  # a gate's moment other than a step (MOMENTS)

    def strikes(self, kind: str, step: int, rank: int, moment: str | None = None) -> bool:
        if kind != self.kind or moment != self.moment or (moment is None and not self.first <= step <= self.last):
            return False
        if self.rank is not None and rank != self.rank:
            return False
        return kind == "nan" or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def parse(spec: str) -> Fault:
    """`kill@6:1` -> Fault("kill", 6, 6, 1); a ValueError names what is wrong."""
    match = _SPEC.match(spec.strip())
    if not match or match["kind"] not in KINDS:
        raise ValueError(f"MTP_FAULT={spec!r} is not KIND@STEP[-STEP][:RANK] with KIND one of {', '.join(KINDS)}")
    rank = None if match["rank"] is None else int(match["rank"])
    if match["moment"]:
        if match["kind"] != "gate" or match["moment"] not in MOMENTS:
            raise ValueError(f"MTP_FAULT={spec!r}: only gate takes a moment, one of {', '.join(MOMENTS)}")
        return Fault("gate", 0, 0, rank, match["moment"])
    first = int(match["first"])
    last = int(match["last"] or first)
    if first < 1 or last < first:
        raise ValueError(f"MTP_FAULT={spec!r}: steps count from 1 and a range goes up")
    return Fault(match["kind"], first, last, rank)


def parse_all(spec: str) -> list[Fault]:
    """`gate@start,kill@6:1` -> both faults."""
    return [parse(part) for part in spec.split(",") if part.strip()]


def from_env() -> list[Fault]:
    """The faults MTP_FAULT asks for; a malformed value is a user error (one line, exit 2)."""
    from pretrain.errors import UserError

    spec = os.environ.get("MTP_FAULT")
    try:
        return parse_all(spec) if spec else []
    except ValueError as err:
        raise UserError(f"{err}; unset MTP_FAULT for a normal run") from None


class FaultInjector:
    """The trainer's hooks; each does nothing unless a configured fault strikes here and now."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults = faults
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
        if self._strikes("gate", step):
            wait_at_gate(f"rank {self.rank} before step {step}", str(step))

    def during_save(self, step: int) -> None:
        if self._strikes("kill-in-save", step):
            _announce(f"killing rank {self.rank} while it writes the checkpoint of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self._strikes("gate-in-save", step):
            wait_at_gate(f"rank {self.rank} while it writes the checkpoint of step {step}", f"save-{step}")

    def at(self, moment: str) -> None:
        """A gate at a moment that is not a step (MOMENTS)."""
        if any(f.strikes("gate", 0, self.rank, moment) for f in self.faults):
            wait_at_gate(f"rank {self.rank} at {moment}", moment)

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
        if not any(f.kind == "nan" for f in self.faults):
            return
        from pretrain.model.vocab import TokenEmbedding

        def hook(module, _inputs, output: torch.Tensor) -> torch.Tensor:
            poisoned = module.training and self._strikes("nan", step_of())  # evaluation stays clean
            return output * float("nan") if poisoned else output

        for module in model.modules():
            if isinstance(module, TokenEmbedding):
                module.register_forward_hook(hook)

    def _strikes(self, kind: str, step: int) -> bool:
        return any(f.strikes(kind, step, self.rank) for f in self.faults)


def wait_at_gate(where: str, label: str) -> None:
    """Block until the gate's file exists or this process got a stop signal (torchrun stops workers with TERM).

    The file is MTP_FAULT_GATE, with `{}` in it replaced by the gate's label
    (the step, `save-STEP` or the moment), so several gates open one by one.
    """
    from pretrain.signals import received

    gate = os.environ["MTP_FAULT_GATE"].replace("{}", label)  # present: pretrain.startup checks
    _announce(f"{where} waits for {gate}")
    while not Path(gate).exists() and received() is None:
        time.sleep(GATE_POLL_S)
    _announce(f"{where} goes on")


def _announce(line: str) -> None:
    print(f"MTP_FAULT: {line}", flush=True)

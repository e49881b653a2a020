"""One trainer per run directory: `<run.dir>/run.lock`, held by the training job for its lifetime.

Two trainers on one run directory (a job submitted twice, a requeued job
starting while the old one shuts down) would write the same checkpoints,
metrics.jsonl and MLflow run. Rank 0 takes this lock before anything in the
run directory is read or written and keeps it until the last write; the job's
other ranks (on every node) run under it, and a lost lock stops them all at
the same step (`pretrain.signals.StopFlag`).

The mechanism is `flufl.lock`, chosen because run directories live on NFS or
Lustre: it creates a unique claim file and link(2)s it to the lock name, the
procedure open(2) gives for NFS (link is one atomic operation on the server,
or on Lustre's metadata server), and checks the link count when the reply
was lost. flock/fcntl locks are not used: on NFS they depend on lockd and the
`nolock`/`local_lock` mount options, on Lustre on the `flock`/`localflock`
mount options, and with `localflock` or `local_lock=all` two nodes both "hold"
the same lock without an error. A lock also survives its holder on a shared
file system, so it carries a heartbeat: the holder refreshes it every
`fault.lock_timeout_s / 4` seconds (flufl.lock's lifetime, kept in the lock
file's mtime), and a lock whose holder is gone is taken over with a warning:
- on the same host, when the holder's PID no longer exists;
- from another host, where a PID means nothing, when the heartbeat is older
  than `fault.lock_timeout_s` (node clocks must agree within flufl.lock's
  10 s slop, as NTP keeps them);
- at once, without a warning, when the holder was an earlier round of this
  same launch: a requeued attempt of the same SLURM job or a torchrun restart
  (same `TORCHELASTIC_RUN_ID`), whose old processes are gone by then.
A live holder is refused in one line naming its host, PID and SLURM job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pretrain.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HOLDER_NAME = "run.lock.holder"  # who holds the lock, as JSON: what a refusal names
ACQUIRE_WAIT_S = 5  # how long flufl.lock may retry the link after a takeover


@dataclass(frozen=True)
class Holder:
    """Who a training job is: enough to name it and to recognise an earlier round of itself."""

    host: str
    pid: int
    job: str | None  # SLURM_JOB_ID
    attempt: str | None  # SLURM_RESTART_COUNT: a requeued job's attempts share the job id
    launch: str | None  # TORCHELASTIC_RUN_ID (torchrun's rendezvous id), unless torchrun's default "none"

    def describe(self) -> str:
        job = f"SLURM job {self.job}" if self.job else "no SLURM job"
        return f"host {self.host}, PID {self.pid}, {job}"

    def same_launch(self, other: Holder) -> bool:
        """An earlier round of this job: its processes are gone when a new round starts."""
        if self.job and other.job:
            return self.job == other.job
        return bool(self.launch) and self.launch == other.launch


def this_process() -> Holder:
    """This process; the host is named as flufl.lock names it in the lock file (the FQDN)."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    return Holder(socket.getfqdn(), os.getpid(), os.environ.get("SLURM_JOB_ID"),
                  os.environ.get("SLURM_RESTART_COUNT"), launch if launch and launch != "none" else None)


class RunLock:
    """The lock of one run directory; `acquire`, then `release` when the run's last write is done."""

    def __init__(self, run_dir: str, timeout_s: int):
        from flufl.lock import Lock

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.timeout_s = timeout_s
        self.me = this_process()
        self.lost: str | None = None  # why the lock is no longer ours, once the heartbeat finds out
        self._lock = Lock(str(self.path), lifetime=timedelta(seconds=timeout_s))
        self._done = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        from flufl.lock import TimeOutError

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._take_over_or_refuse()
        try:
            self._lock.lock(timeout=timedelta(seconds=ACQUIRE_WAIT_S))
        except TimeOutError:  # another trainer took it between our look and our link
            self._refuse(self._holder())
        _write_json(self.run_dir / HOLDER_NAME, asdict(self.me))
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (unless another trainer has taken it over)."""
        self._done.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        if self.lost is None and self._lock.is_locked:
            holder = self.run_dir / HOLDER_NAME
            if self._holder() == self.me:
                holder.unlink(missing_ok=True)
        self._lock.unlock(unconditionally=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()

    # ---- deciding about an existing lock ---------------------------------------------

    def _take_over_or_refuse(self) -> None:
        """Make a lock whose holder is gone expire, so flufl.lock breaks it; refuse a live one."""
        from flufl.lock import NotLockedError

        try:
            host, pid, _ = self._lock.details
        except NotLockedError:  # gone meanwhile, or not written by flufl.lock
            if self.path.exists() and self._heartbeat_age_s() < self.timeout_s:
                raise UserError(f"{self.path} exists but names no holder; if no trainer uses {self.run_dir}, "
                                "remove it and re-run") from None
            return
        recorded = self._holder()
        holder = recorded if recorded and (recorded.host, recorded.pid) == (host, pid) else Holder(
            host, pid, None, None, None)
        gone_here = host == self.me.host and not _pid_alive(pid)
        if holder.same_launch(self.me) and (host != self.me.host or gone_here):
            # Another host's PID cannot be checked: its round ended when torchrun started this one.
            log.info("taking over %s from an earlier round of this job (%s)", self.path, holder.describe())
        elif gone_here:
            log.warning("taking over %s: its holder (%s) no longer runs", self.path, holder.describe())
        elif host != self.me.host and self._heartbeat_age_s() > self.timeout_s:
            log.warning("taking over %s: its holder (%s) last renewed it %.0f s ago, more than "
                        "fault.lock_timeout_s=%d", self.path, holder.describe(), self._heartbeat_age_s(),
                        self.timeout_s)
        else:
            self._refuse(holder)
        try:
            os.utime(self.path, (0, 0))  # expired: flufl.lock's own breaking removes it and its claim file
        except FileNotFoundError:
            pass

    def _refuse(self, holder: Holder | None) -> None:
        who = holder.describe() if holder else "a trainer that left no record"
        age = self._heartbeat_age_s()
        beat = f"heartbeat {age:.0f} s ago" if age != float("inf") else "no heartbeat"
        raise UserError(
            f"run directory {self.run_dir} is in use by another trainer ({who}, {beat}); wait for it to end "
            f"or stop it, or use another run.dir (a lock whose holder is gone is taken over: same host when its "
            f"PID is gone, other hosts after fault.lock_timeout_s={self.timeout_s} s without a heartbeat)"
        ) from None

    def _holder(self) -> Holder | None:
        try:
            return Holder(**json.loads((self.run_dir / HOLDER_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _heartbeat_age_s(self) -> float:
        """Seconds since the holder last renewed the lock (flufl.lock keeps expiry = renewal + lifetime)."""
        try:
            expires = self._lock.expiration
        except OSError:
            return float("inf")
        return (datetime.now() - (expires - self._lock.lifetime)).total_seconds()

    def _heartbeat(self) -> None:
        from flufl.lock import NotLockedError

        complained = False
        while not self._done.wait(max(1.0, self.timeout_s / 4)):
            try:
                self._lock.refresh()
                complained = False
            except NotLockedError:
                holder = self._holder()
                self.lost = f"{self.path} now held by {holder.describe() if holder else 'another trainer'}"
                log.error("lost the run-directory lock: %s", self.lost)
                return
            except OSError as err:  # a file system hiccup: try again at the next beat
                if not complained:
                    log.warning("could not renew %s (%s); retrying", self.path, err)
                complained = True


def hold_run_dir(run_dir: str, timeout_s: int) -> RunLock | None:
    """Rank 0 takes the lock (RANK unset or 0); every other rank runs under rank 0's and gets None."""
    if os.environ.get("RANK", "0") != "0":
        return None
    return RunLock(run_dir, timeout_s).acquire()


def _pid_alive(pid: int) -> bool:
    """A running process (a zombie is a process that has ended, waiting for its parent to notice)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)

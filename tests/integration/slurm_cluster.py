"""A real one-node SLURM cluster on loopback, for tests.

`munged`, `slurmctld` and `slurmd` from Debian's `slurm-wlm` and `munge` run
in the foreground as children of the test process, with every file they use
(key, `slurm.conf`, state, spool, logs) in one temp dir and their ports
picked free on 127.0.0.1. A test cluster therefore never touches a system
SLURM, and clients (`sbatch`, `squeue`, `scontrol`, ...) find it only
through `SLURM_CONF` in `SlurmCluster.env`.

Settings that differ from a production cluster, and why:
- `cred_expire=10`: SLURM holds a requeued job back for `cred_expire`
  seconds (default 120); a preemption test should not wait two minutes.
- `sched_interval=2`, `bf_interval=2`: start a job that just became eligible
  (after that hold) within seconds rather than at the next 30-60 s pass.
- no cgroups (`proctrack/linuxproc`, `task/none`): containers and CI
  machines rarely delegate cgroups to us, and one node needs no isolation.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
NODE = "localhost"
# JobState values after which a job will not run again unless someone requeues it.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY",
}


class ClusterError(RuntimeError):
    """The cluster could not start or a job did not behave; the message holds the daemons' log tails."""


def missing_tools() -> list[str]:
    """The daemons and clients this machine lacks (`make system-deps` installs them)."""
    return [tool for tool in (*DAEMONS, *CLIENTS) if shutil.which(tool) is None]


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on loopback, held open together so they cannot repeat."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _memory_mb() -> int:
    """Half the machine's memory: a node may not claim more than slurmd measures, or it is drained."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2


LOOPBACK_NODES = ((NODE, "127.0.0.1"),)


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, nodes=LOOPBACK_NODES, ctld_addr: str = "127.0.0.1",
               extra: tuple[str, ...] = ()) -> str:
    """The whole config of a cluster whose files all live under `root`; `nodes`: (NodeName, NodeAddr) pairs.

    `%n` in slurmd's paths is the node's name, so several slurmd on one machine keep apart.
    """
    user = getpass.getuser()
    names = ",".join(name for name, _ in nodes)
    return "\n".join([
        "ClusterName=mtptest",
        f"SlurmctldHost={NODE}({ctld_addr})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.sock,cred_expire=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "JobRequeue=1",
        "MpiDefault=none",
        "ReturnToService=2",
        "MessageTimeout=30",
        "KillWait=10",
        "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        *extra,
        *(f"NodeName={name} NodeAddr={addr} CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN"
          for name, addr in nodes),
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


# With proctrack/linuxproc and task/none slurmd loads no cgroup plugin; the
# file only documents that choice for whoever reads the temp dir.
CGROUP_CONF = "# No cgroup plugin is used: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none.\n"


def write_files(root: Path, nodes=LOOPBACK_NODES, ctld_addr: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> None:
    """The munge key, slurm.conf, cgroup.conf and the dirs the daemons expect to exist."""
    for sub in ("munge", "state", "spool", "log", "run", *(f"spool/{name}" for name, _ in nodes)):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)  # munged refuses a key others can read
    ctld_port, slurmd_port = _free_ports(2)
    (root / "slurm.conf").write_text(slurm_conf(root, ctld_port, slurmd_port, nodes, ctld_addr, extra))
    (root / "cgroup.conf").write_text(CGROUP_CONF)


@dataclass
class SlurmCluster:
    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment under which SLURM clients talk to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- life cycle -----------------------------------------------------------

    @classmethod
    def start(cls, timeout: float = 90) -> SlurmCluster:
        """Write the files, start the three daemons, return once the node takes jobs."""
        root = Path(tempfile.mkdtemp(prefix="mtp-slurm-", dir="/tmp"))  # short: munge's socket path is limited
        root.chmod(0o755)
        cluster = cls(root)
        try:
            cluster._write_files()
            cluster._start_daemons(time.monotonic() + timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_files(self) -> None:
        write_files(self.root)

    def _start_daemons(self, deadline: float) -> None:
        self._start_controller(deadline)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
        self._wait(deadline, f"node {NODE} to become idle", lambda: self.node_state() == "idle")

    def _start_controller(self, deadline: float) -> None:
        """munged, then slurmctld, until it answers."""
        munge = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={munge}/munge.key",
                               f"--socket={munge}/munge.sock", f"--pid-file={munge}/munged.pid",
                               f"--seed-file={munge}/munged.seed", f"--log-file={self.root}/log/munged.log"])
        self._wait(deadline, "munged to open its socket", lambda: (munge / "munge.sock").exists())
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(deadline, "slurmctld to answer", lambda: self.run("scontrol", "ping", check=False).returncode == 0)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        console = open(self.root / "log" / f"{name}.console", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        console.close()

    def _wait(self, deadline: float, what: str, ready) -> None:
        """Poll `ready` until it holds; fail at once if a daemon died, with the logs that say why."""
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with status {proc.returncode} while waiting for {what}\n"
                                       + self.log_tails())
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}\n" + self.log_tails())
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (newest first), remove all state."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", getpass.getuser(), check=False)
            self._wait_quietly(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 30)
        for name in reversed(list(self.procs)):
            _terminate(self.procs[name])
        self._kill_strays()
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _wait_quietly(done, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _kill_strays(self) -> None:
        """Kill job processes that outlived their slurmd: they carry our SLURM_CONF, nobody else's does."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in _processes_with_env(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---- clients ----------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client against this cluster."""
        proc = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}\n" + self.log_tails())
        return proc

    def node_state(self, node: str = NODE) -> str:
        return self.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, NodeList, ..."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Wait until the job reaches a final state (a requeued job is waited for again) and return it."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s: {info}\n"
                                   + self.log_tails())
            time.sleep(poll)

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon's log and console output, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _processes_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids

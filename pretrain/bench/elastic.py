"""Elastic membership drills for `mtp bench faults`: two torchrun agents as two nodes on one machine.

Each agent is its own process group (a "node": agent + worker), both join one
c10d rendezvous on loopback with `--nnodes=1:2`, one process per node, so the
world is 2 with both and 1 with one. The global batch stays the same; the
data-parallel size and the gradient accumulation change with the world.

- node-lost: both nodes train; before step 7 (both wait at a gate) node B is
  SIGKILLed, agent and worker; node A's worker finds its peer gone, exits 1,
  and its agent re-forms the group alone (after torchrun's last-call wait)
  from the newest checkpoint.
- node-joined: node A trains alone; before step 7 (A waits at a gate) node B
  starts; A's agent sees it waiting and stops A's worker with SIGTERM, which
  finishes step 7, checkpoints it and exits 0; the two-node group resumes.
Both are held to the undisturbed two-process reference within a relative
tolerance: the reduction order changes with the world.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

WAIT_S = 600
LOSS_TOLERANCE = 1e-4  # dp=2 all-reduce vs dp=1 accumulation: float32 sums in another order


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent(runner, run_dir: Path, port: int, host: bool) -> list[str]:
    """A torchrun agent of one worker joining the run's c10d rendezvous on `port` (`--nnodes=1:2`)."""
    from pretrain.bench.faults import SHAPE

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
            "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_dir.name}", f"--rdzv-conf=is_host={1 if host else 0}", "-m", "pretrain.cli", "train",
            "--config", "configs/tiny-cpu.yaml", *SHAPE, f"data.dir={runner.data}", f"run.dir={run_dir}"]


class Node:
    """A launcher (torchrun agent) and its workers, in a session of their own (so they can be killed as a node)."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str):
        from pretrain.bench.faults import REPO

        self.name, self.start = name, time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def has(self, needle: str, count: int = 1) -> bool:
        return sum(needle in line for _, line in list(self.lines)) >= count

    def kill(self) -> None:
        """SIGKILL the agent and every process below it (torchrun puts workers in sessions of their own)."""
        import psutil

        try:
            agent = psutil.Process(self.proc.pid)
            family = [*agent.children(recursive=True), agent]
        except psutil.NoSuchProcess:  # already gone, and its workers with it
            return
        for proc in family:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def wait(self) -> int:
        try:
            code = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.reader.join(timeout=30)
        return code


class DrillStalled(RuntimeError):
    """A drill's run never reached the state the drill waits for: the drill fails, the others still run."""


def wait_until(what: str, ready, nodes: list[Node]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline or all(n.proc.poll() is not None for n in nodes):
            tail = "\n".join(line for n in nodes for _, line in n.lines[-20:])
            for node in nodes:
                node.kill()
            raise DrillStalled(f"no {what}:\n{tail}")
        time.sleep(0.2)


def drill_env(gate: Path | None = None, fault: str | None = None) -> dict[str, str]:
    """A drill run's environment: its fault (MTP_FAULT) and the gate files it waits for, if any."""
    from pretrain.bench.faults import _env as base_env

    env = base_env(fault)
    if gate is not None:
        env["MTP_FAULT_GATE"] = str(gate)
    return env


def node_lost(runner, run_dir: Path):
    """Both nodes, node B killed before step 7; returns the bench's attempts (one timeline per node)."""
    gate = runner.root / f"{run_dir.name}-gate-{{}}"
    port = _port()
    a = Node(agent(runner, run_dir, port, True), drill_env(gate, "gate@7"), "A")
    b = Node(agent(runner, run_dir, port, False), drill_env(gate, "gate@7"), "B")
    wait_until("two workers at the gate", lambda: sum(n.has("waits for") for n in (a, b)) == 2, [a, b])
    b.kill()
    a.lines.append((time.monotonic(), "MTP_FAULT: node B (agent and worker) SIGKILLed before step 7"))
    Path(str(gate).replace("{}", "7")).touch()
    b.wait()
    return as_attempts(a.wait(), a, b)


def node_joined(runner, run_dir: Path):
    """Node A alone, node B joining before step 7."""
    gate = runner.root / f"{run_dir.name}-gate-{{}}"
    port = _port()
    a = Node(agent(runner, run_dir, port, True), drill_env(gate, "gate@7"), "A")
    wait_until("node A at the gate", lambda: a.has("waits for"), [a])
    a.lines.append((time.monotonic(), "MTP_FAULT: node B starts and joins before step 7"))
    b = Node(agent(runner, run_dir, port, False), drill_env(), "B")
    code_b, code_a = b.wait(), a.wait()
    return as_attempts(max(code_a, code_b), a, b)


def as_attempts(code: int, *nodes: Node):
    """All nodes' lines as one attempt on one clock, as the other drills' timelines."""
    from pretrain.bench.faults import Attempt

    start = min(n.start for n in nodes)
    lines = sorted((t - start, line) for n in nodes for t, line in n.lines)
    return [Attempt(code, lines)]


def second_trainer(runner, run_dir: Path):
    """A second identical launch on the run directory while the first waits before step 7."""
    gate = runner.root / f"{run_dir.name}-gate-{{}}"
    port = _port()
    first = Node(agent(runner, run_dir, port, True), drill_env(gate, "gate@7"), "first")
    wait_until("the first trainer at the gate", lambda: first.has("waits for"), [first])
    second = Node(agent(runner, run_dir, _port(), True), drill_env(), "second")
    code = second.wait()
    refusal = next((line for _, line in second.lines if "is in use by another trainer" in line), "")
    first.lines.append((time.monotonic(), f"MTP_FAULT: a second trainer exited {code}: {refusal}"))
    Path(str(gate).replace("{}", "7")).touch()
    return as_attempts(first.wait(), first)

"""A real two-node SLURM cluster on one machine, for tests: one `slurmd` per network namespace.

It is `SlurmCluster` (slurm_cluster.py: munged, slurmctld and slurmd as
children, every file in one temp dir, clients through `SLURM_CONF`) with its
compute nodes moved off loopback:

- a bridge in the root namespace holds the controller's address
  (`PREFIX.1`), and one veth pair per node links a network namespace of its
  own to it (`PREFIX.2`, `PREFIX.3`, ...): each node has its own address,
  ports and loopback, as separate machines would;
- each node's slurmd runs in its network namespace (`nsenter`) and in mount
  and UTS namespaces of its own (`unshare`), with its own hostname (the node's name) and
  an `/etc/hosts`, bind-mounted there, that maps every node name to its
  address; the job steps it starts inherit all of that, so torchrun's c10d
  rendezvous and gloo reach the other node by name, as on a real cluster;
- munged is shared: its socket is a file path, and network namespaces do not
  separate the file system (which is the shared file system of the "nodes").

Names are unique per cluster (a random suffix; the /24 is picked among the
ones no interface uses), and `stop()` removes the namespaces and the bridge
even when the start failed half way. `fail_node` makes a node fail as a
powered-off machine does: its link goes down first, so its peers get no
reset and its packets just vanish, then every process in its namespace is
SIGKILLed.

Settings beyond slurm_cluster.py's: `SlurmdTimeout=20` (default 300), so the
controller declares a dead node DOWN within a test's patience.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from tests.integration.slurm_cluster import ClusterError, SlurmCluster, write_files

SLURMD_TIMEOUT_S = 20
TWO_NODE_SETTINGS = (f"SlurmdTimeout={SLURMD_TIMEOUT_S}",)


def missing_netns_support() -> str | None:
    """Why this machine cannot build the cluster's network, or None."""
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and bridges need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount", "hostname") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing (package iproute2 / util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _free_prefix() -> str:
    """A 10.231.N /24 (as '10.231.N') that no interface of this machine has an address in."""
    used = _ip("-o", "-4", "addr", "show").stdout
    free = [n for n in range(256) if f" 10.231.{n}." not in used]
    if not free:
        raise ClusterError("every 10.231.N.0/24 is in use on this machine")
    return f"10.231.{random.choice(free)}"


@dataclass(frozen=True)
class Node:
    name: str  # NodeName, and the hostname inside its namespace
    addr: str  # NodeAddr
    netns: str  # network namespace
    veth: str  # the veth end on the bridge (root namespace)


@dataclass
class NetnsSlurmCluster(SlurmCluster):
    node_count: int = 2
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    prefix: str = ""
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def start(cls, timeout: float = 120) -> NetnsSlurmCluster:
        return super().start(timeout)

    @property
    def bridge(self) -> str:
        return f"mtpbr{self.suffix}"  # at most 15 characters, as every interface name

    @property
    def ctld_addr(self) -> str:
        return f"{self.prefix}.1"

    # ---- life cycle (SlurmCluster.start calls these) ------------------------------

    def _write_files(self) -> None:
        self._make_network()
        write_files(self.root, [(n.name, n.addr) for n in self.nodes], self.ctld_addr, TWO_NODE_SETTINGS)
        hosts = ["127.0.0.1 localhost", *(f"{n.addr} {n.name}" for n in self.nodes)]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def _make_network(self) -> None:
        self.prefix = _free_prefix()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctld_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(1, self.node_count + 1):
            node = Node(f"n{i}", f"{self.prefix}.{i + 1}", f"mtp-{self.suffix}-n{i}", f"mtpv{i}{self.suffix}")
            _ip("netns", "add", node.netns)
            self.nodes.append(node)  # from here on stop() removes it
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _ip("link", "set", node.veth, "master", self.bridge, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")

    def _start_daemons(self, deadline: float) -> None:
        self._start_controller(deadline)
        for node in self.nodes:
            # nsenter: the node's network; unshare: a mount namespace (private propagation) for its
            # hosts file, a UTS one for its hostname. Not `ip netns exec`: it remounts /sys, which
            # hides /sys/fs/cgroup, and slurmd will not start without it.
            self._spawn(f"slurmd-{node.name}", [
                "nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--mount", "--uts", "--", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && exec slurmd -D -f "$2" -N "$1"',
                str(self.root / "hosts"), node.name, str(self.conf)])
        for node in self.nodes:
            self._wait(deadline, f"node {node.name} to become idle", lambda n=node.name: self.node_state(n) == "idle")

    def stop(self) -> None:
        """SlurmCluster.stop, then every process left in the namespaces, the namespaces and the bridge."""
        try:
            super().stop()
        finally:
            for node in self.nodes:
                self._kill_namespace(node)
                # Deleting one end deletes the pair; the namespace's deletion alone does not always
                # (gVisor keeps the root end).
                _ip("link", "del", node.veth, check=False)
                _ip("netns", "del", node.netns, check=False)
            _ip("link", "del", self.bridge, check=False)

    # ---- faults -------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def fail_node(self, name: str) -> None:
        """Node `name` fails as a powered-off machine: link down (no resets, packets vanish), then every
        process in its namespace (slurmd, slurmstepd, the job's) SIGKILLed."""
        node = self.node(name)
        _ip("link", "set", node.veth, "down")
        slurmd = self.procs.pop(f"slurmd-{name}")  # dies on purpose: _wait must not call that a failed start
        self._kill_namespace(node)
        slurmd.wait(timeout=30)

    def _kill_namespace(self, node: Node, timeout: float = 30) -> None:
        """SIGKILL every process in the node's network namespace until none is left (a dying slurmstepd may fork)."""
        deadline = time.monotonic() + timeout
        while pids := self._pids(node):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {pids} in {node.netns} survive SIGKILL")
            time.sleep(0.2)

    @staticmethod
    def _pids(node: Node) -> list[int]:
        done = _ip("netns", "pids", node.netns, check=False)
        return [int(pid) for pid in done.stdout.split() if int(pid) != os.getpid()] if done.returncode == 0 else []

"""Side-service outages for `mtp bench faults`: the tracking server going away, the checkpoint disk filling up.

Both run the drills' usual torchrun group in the background and act at
gates (pretrain/faults.py), so every fault lands at a known step:

- tracking-down: a real `mlflow server` stops before step 5 and comes back
  before step 10 (same store, same port). Training must not wait for it,
  the MLflow run must end complete (every step once) and FINISHED.
- disk-full: the checkpoint directory is a small tmpfs, filled just before
  step 8, whose checkpoint then fails with ENOSPC: one line, exit 1, the
  partial checkpoint removed, step 4's kept. The space is freed when that
  line appears, as an operator would; torchrun's restart resumes from step 4.
"""

from __future__ import annotations

import time
from pathlib import Path

from pretrain.bench.elastic import Node, as_attempts, drill_env, wait_until
from pretrain.errors import UserError


def _gate(runner, run_dir: Path) -> Path:
    return runner.root / f"{run_dir.name}-gate-{{}}"


def _open(gate: Path, label: str) -> None:
    Path(str(gate).replace("{}", label)).touch()


def _at_gate(node: Node, gate: Path, label: str) -> None:
    path = str(gate).replace("{}", label)
    wait_until(f"the trainer at {path}", lambda: node.has(f"waits for {path}"), [node])


def tracking_down(runner, run_dir: Path):
    """Training against a real MLflow server that is down for steps 5-9."""
    from mlflow.tracking import MlflowClient

    from pretrain.local_mlflow import free_port, serve

    gate, port, store = _gate(runner, run_dir), free_port(), runner.root / f"{run_dir.name}-mlflow"
    with serve(store, port) as server:
        node = Node(runner.command(run_dir, ("tracking.enabled=true", f"tracking.uri={server.uri}",
                                             "tracking.close_timeout_s=300")),
                    drill_env(gate, "gate@5,gate@10"), "trainer")
        _at_gate(node, gate, "5")
    node.lines.append((time.monotonic(), "MTP_FAULT: the MLflow server stopped before step 5"))
    _open(gate, "5")
    _at_gate(node, gate, "10")
    with serve(store, port) as server:
        node.lines.append((time.monotonic(), "MTP_FAULT: the MLflow server is back before step 10"))
        _open(gate, "10")
        code = node.wait()
        node.lines.append((time.monotonic(), "MTP_FAULT: " + _mlflow_record(MlflowClient(server.uri), node)))
    return as_attempts(code, node)


def _mlflow_record(client, node: Node) -> str:
    """What the MLflow run holds after the outage, and the trainer's warnings about it."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if len(runs) != 1:
        return f"MLflow INCOMPLETE: {len(runs)} runs instead of one"
    run = runs[0]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_head1"))
    from pretrain.bench.faults import STEPS

    complete = steps == list(range(1, STEPS + 1)) and run.info.status == "FINISHED"
    trainer = [line for _, line in node.lines if not line.startswith("MTP_FAULT:")]
    warned = sum("unreachable" in line for line in trainer), sum("is back" in line for line in trainer)
    return (f"MLflow {'complete' if complete else 'INCOMPLETE'}: {len(steps)} of {STEPS} steps once each "
            f"in the run, status {run.info.status}; the trainer warned {warned[0]}x unreachable, {warned[1]}x back")


def disk_full(runner, run_dir: Path):
    """Checkpoints on a 64 MB tmpfs that fills up before step 8's checkpoint."""
    from pretrain.bench.tmpfs import CannotMount, fill, small_tmpfs

    gate = _gate(runner, run_dir)
    try:
        with small_tmpfs(runner.root, 64 << 20) as disk:
            node = Node(runner.command(run_dir, (f"checkpoint.dir={disk / 'checkpoints'}",)),
                        drill_env(gate, "gate@8"), "trainer")
            _at_gate(node, gate, "8")
            ballast = fill(disk)
            node.lines.append((time.monotonic(), "MTP_FAULT: the checkpoint file system filled before step 8"))
            _open(gate, "8")
            wait_until("the trainer's no-space line",
                       lambda: any("no space left" in line.lower() for _, line in list(node.lines)), [node])
            ballast.unlink()
            node.lines.append((time.monotonic(), "MTP_FAULT: space freed; torchrun restarts the group"))
            code = node.wait()
            left = sorted(p.name for p in (disk / "checkpoints").iterdir())
            node.lines.append((time.monotonic(), f"MTP_FAULT: checkpoint directory after the run: {', '.join(left)}"))
    except CannotMount as err:
        raise UserError(f"the disk-full drill mounts a tmpfs ({err}); run it as root, or leave it out with "
                        "--drills") from None
    return as_attempts(code, node)

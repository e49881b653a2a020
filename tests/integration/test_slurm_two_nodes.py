"""SLURM on a real two-node cluster (slurm_netns.py: one slurmd per network namespace): a node failure.

`mtp submit --nodes 2` runs one torchrun agent per node, 1 gloo process each
(dp=2), through the real `sbatch` -> `srun` -> `torchrun` -> `mtp train`, with
the c10d rendezvous on the first node and gloo between the namespaces. The
node-failure test submits with `--min-nodes 1` and, while both processes wait
before step 7, fails node n2 as a powered-off machine does (link down, every
process on it SIGKILLed). The survivor's collective times out, its agent
re-forms the group alone, and the job must end COMPLETED on n1 with the same
data and (to the reduction order) the same losses as the undisturbed job.
"""

import json
import os
import re
from pathlib import Path

import pytest

from tests.integration import slurm_netns
from tests.integration.conftest import mtp_env, run_mtp
from tests.integration.slurm_cluster import ClusterError
from tests.integration.slurm_netns import NetnsSlurmCluster, missing_netns_support
from tests.integration.test_slurm import (
    _require_cluster_tools,
    finish,
    flat_head_losses,
    job_id,
    job_log,
    shown,
    wait_until,
)
from tests.integration.test_train import TINY, metrics

LOSS_TOLERANCE = 1e-4  # dp=2 all-reduce vs dp=1 accumulation: float32 sums in another order
# Sample logs for the data audit; a dead peer sends no reset, so the survivor's collective waits
# fault.collective_timeout_s before its agent restarts the group (default 600 s).
RUN = ["data.log_sample_ids=true", "fault.collective_timeout_s=10", "tracking.enabled=false"]


def _require_netns() -> None:
    """Skip without root or iproute2/util-linux; in CI (CI=true) fail instead, never skip."""
    _require_cluster_tools()
    problem = missing_netns_support()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"the two-node SLURM cluster cannot be built: {problem}")
    if problem:
        pytest.skip(f"the two-node SLURM cluster cannot be built: {problem}")


@pytest.fixture(scope="module")
def cluster():
    _require_netns()
    started = NetnsSlurmCluster.start()
    yield started
    started.stop()


def submit(cluster: NetnsSlurmCluster, run_dir: Path, data: Path, *extra: str, **env: str):
    """`mtp submit` of the tiny config on both nodes, 1 process each (`extra`: more submit arguments)."""
    return run_mtp("submit", "--config", "configs/tiny-cpu.yaml", "--nodes", "2", "--nproc-per-node", "1", *extra,
                   *TINY, *RUN, f"data.dir={data}", f"run.dir={run_dir}",
                   env=mtp_env(SLURM_CONF=str(cluster.conf), **env))


def sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Step -> the window ids all data-parallel ranks trained on in it, sorted (the logs roll back on resume)."""
    steps: dict[int, list[int]] = {}
    for path in sorted((run_dir / "samples").glob("dp*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["ids"])
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


@pytest.fixture(scope="module")
def reference(cluster, small_corpus, tmp_path_factory) -> tuple[Path, int, dict[str, str]]:
    """An undisturbed 20-step job on both nodes (dp=2)."""
    run_dir = tmp_path_factory.mktemp("slurm-two-nodes") / "reference"
    job = job_id(submit(cluster, run_dir, small_corpus))
    info = finish(cluster, run_dir, job)
    return run_dir, job, info


def test_a_two_node_job_trains_across_both_nodes(reference):
    run_dir, job, info = reference
    log = job_log(run_dir, job)
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert "on 2 node(s) (min 2) x 1 process(es), rendezvous n1:" in log, shown(run_dir, job)
    assert "runtime: 2 process(es)" in log and "resumed from" not in log, shown(run_dir, job)
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert set(sample_ids(run_dir)) == set(range(1, 21))


def test_a_failed_node_leaves_the_survivor_training_to_completion(cluster, reference, small_corpus, tmp_path):
    run_dir, gate = tmp_path / "node-failed", tmp_path / "gate-{}"
    job = job_id(submit(cluster, run_dir, small_corpus, "--min-nodes", "1",
                        MTP_FAULT="gate@7", MTP_FAULT_GATE=str(gate)))
    wait_until(cluster, run_dir, job, "both ranks wait before step 7",
               lambda: job_log(run_dir, job).count("before step 7 waits for") == 2)
    cluster.fail_node("n2")
    Path(str(gate).replace("{}", "7")).touch()
    info = finish(cluster, run_dir, job)
    log = job_log(run_dir, job)

    # SLURM: the node is declared DOWN and taken out of the job; the step's task on n1 goes on.
    ctld = (cluster.root / "log" / "slurmctld.log").read_text()
    assert f"Removing failed node n2 from JobId={job}" in ctld, cluster.log_tails()
    assert info["NodeList"] == "n1" and info["Restarts"] == "0", info
    assert cluster.node_state("n2").startswith("down"), cluster.node_state("n2")
    assert "srun: error: Node failure on n2" in log, shown(run_dir, job)
    # torchrun on n1: the collective with the dead rank times out, the agent re-forms the group alone.
    assert "a collective did not finish within fault.collective_timeout_s=10s" in log, shown(run_dir, job)
    assert re.search(rf"resumed from {run_dir}/checkpoints/step_000005 at step 5", log), shown(run_dir, job)
    assert "runtime: 1 process(es)" in log and "training exited with status 0" in log, shown(run_dir, job)

    ref = reference[0]
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 21))
    assert flat_head_losses(run_dir) == pytest.approx(flat_head_losses(ref), rel=LOSS_TOLERANCE)
    assert sample_ids(run_dir) == sample_ids(ref), "windows lost or repeated across the node failure"


def _network() -> tuple[str, str]:
    return slurm_netns._ip("netns", "list").stdout, slurm_netns._ip("-o", "link", "show").stdout


def test_a_cluster_that_fails_to_start_leaves_no_namespace_or_link(monkeypatch):
    _require_netns()
    before = _network()
    monkeypatch.setattr(slurm_netns, "TWO_NODE_SETTINGS", ("NoSuchOption=1",))
    with pytest.raises(ClusterError) as failure:
        NetnsSlurmCluster.start(timeout=60)
    assert "slurmctld exited" in str(failure.value) and "NoSuchOption" in str(failure.value)
    assert _network() == before

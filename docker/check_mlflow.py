"""Check that the MLflow server holds a finished training run with every head's losses.

Run by docker/smoke-test.sh inside the image, beside the run directory: it
compares what the server returns (through its REST API, with MlflowClient)
against the run's own metrics.jsonl, step by step, so a server that lost or
mangled metrics fails, and so does a run that logged nothing.

    python3 check_mlflow.py --run-dir runs/demo --experiment mtp-tiny --heads 4
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ARTIFACTS = {"config.yaml", "metrics.jsonl", "head_losses.png"}  # what the trainer logs at the end


def check(run_dir: Path, experiment: str, heads: int) -> list[str]:
    client = MlflowClient()  # MLFLOW_TRACKING_URI: the server under test
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [f"experiment {experiment!r} not on the server"]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    problems = []
    if run.info.experiment_id != found.experiment_id:
        problems.append(f"run {run_id} is not in experiment {experiment!r}")
    if run.info.status != "FINISHED":
        problems.append(f"run {run_id} is {run.info.status}, not FINISHED")
    if run.data.params.get("model.n_future") != str(heads):
        problems.append(f"param model.n_future is {run.data.params.get('model.n_future')!r}, not {heads}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        problems.append(f"{run_dir}/metrics.jsonl is empty")
    for key in ["loss", *(f"loss_head{k}" for k in range(1, heads + 1))]:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        expected = {row["step"]: row[key] for row in rows if key in row}
        if set(logged) != set(expected):
            problems.append(f"{key}: server has steps {sorted(logged)}, metrics.jsonl {sorted(expected)}")
        elif not all(math.isclose(logged[s], expected[s], rel_tol=1e-6) for s in expected):
            problems.append(f"{key}: server values differ from metrics.jsonl")
    missing = ARTIFACTS - {a.path for a in client.list_artifacts(run_id)}
    if missing:
        problems.append(f"artifacts missing on the server: {sorted(missing)}")
    if not problems:
        print(f"MLflow at {os.environ.get('MLFLOW_TRACKING_URI')}: run {run_id} FINISHED, {len(rows)} steps of "
              f"loss and loss_head1..{heads} equal to metrics.jsonl, artifacts {sorted(ARTIFACTS)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run directory (holds mlflow_run_id)")
    parser.add_argument("--experiment", required=True, help="tracking.experiment of the run")
    parser.add_argument("--heads", type=int, required=True, help="model.n_future of the run")
    args = parser.parse_args()
    problems = check(args.run_dir, args.experiment, args.heads)
    for problem in problems:
        print(f"check_mlflow: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

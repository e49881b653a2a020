"""MLflow's side of run tracking: the synchronous client of one run, and metrics rows into a run.

Uses `MlflowClient` directly: no global active run, so a library user's own
`mlflow.start_run()` is never disturbed and a resumed job logs into the run
id its checkpoint recorded. `Tracker` is the synchronous client of one run;
the training loop never calls it: rank 0 hands every step to a
`pretrain.tracking_background.BackgroundTracker`, whose thread does the
network I/O, so a slow or unreachable server never stalls a step.

MLflow's own HTTP settings are shortened here (unless already set): a
request gives up after MLFLOW_HTTP_REQUEST_TIMEOUT=5 s and is retried
MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 time after ~1 s, instead of 120 s and 7
retries with exponential backoff (minutes per call). Only the start of a
fresh run (create the run, log the params) and `close` wait for MLflow.

Only a process that tracks imports this module (`pretrain.tracking.make_tracker`):
ranks other than 0 and runs with tracking off never load MLflow.
"""

import json
import logging
import os
import time
from pathlib import Path

# MLflow starts its usage telemetry at import unless told not to; nothing
# here may reach the network except the tracking URI the user configured.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
HTTP_DEFAULTS = {  # read by MLflow at every request
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH  # noqa: E402

from pretrain.errors import UserError  # noqa: E402
from pretrain.tracking import first_line  # noqa: E402

log = logging.getLogger("pretrain.tracking")  # one logger for every tracking message


class Tracker:
    """One MLflow run: created, or resumed when `run_id` is given.

    A fresh run needs the server now (a wrong URI should fail at once); a
    resumed run does not: its id is known, and `confirm` marks it running
    again once the server answers.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.confirmed = run_id is None
        if run_id:
            self.run_id = run_id
            self._check_resumable()
            return
        try:
            self.run_id = self._create(experiment, run_name)
        except MlflowException as err:
            raise UserError(
                f"MLflow tracking at {uri} failed: {first_line(err)}; check tracking.uri / MLFLOW_TRACKING_URI "
                "or set tracking.enabled=false"
            ) from None

    def _create(self, experiment: str, run_name: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = self.client.create_experiment(experiment, artifact_location=_local_artifact_root(self.uri))
        return self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def _check_resumable(self) -> None:
        """A store that answers must know the run; one that does not answer is tried again later."""
        try:
            self.confirm()
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise UserError(
                    f"MLflow run {self.run_id} recorded in the checkpoint does not exist at {self.uri}; point "
                    "tracking.uri at the store the run started with, or set tracking.enabled=false"
                ) from None
            log.warning("MLflow at %s unreachable (%s); training resumes and its metrics are sent once it answers",
                        self.uri, first_line(err))

    def confirm(self) -> None:
        """Mark the resumed run running again (raises while the store is unreachable)."""
        if not self.confirmed:
            self.client.get_run(self.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            self.confirmed = True

    def log_params(self, params: dict) -> None:
        """Log params; on a resumed run, keys already logged are kept and a changed value is warned about.

        MLflow params are immutable, so a resumed run with e.g. a longer
        train.max_steps cannot overwrite the old value.
        """
        existing = self.client.get_run(self.run_id).data.params
        fresh = []
        for key, value in params.items():
            text = _param_text(value)
            if key not in existing:
                fresh.append(Param(key, text))
            elif existing[key] != text:
                log.warning("MLflow param %s stays %r in run %s; this job uses %r", key, existing[key], self.run_id, text)
        for i in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def send(self, rows: list[dict]) -> None:
        """Log metrics.jsonl-shaped rows ({"step": s, name: value, ...}); raises if MLflow does not take them."""
        send_rows(self.client, self.run_id, rows)

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def terminate(self, status: str) -> None:
        """Mark the run ended: "FINISHED", "FAILED" or "KILLED"."""
        self.client.set_terminated(self.run_id, status=status)


def send_rows(client: MlflowClient, run_id: str, rows: list[dict]) -> None:
    """metrics.jsonl-shaped rows into an existing run, in MLflow's largest batches."""
    now_ms = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now_ms, row["step"]) for row in rows for key, value in row.items()
               if key != "step"]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH], synchronous=True)


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, not in ./mlruns of whatever the cwd is.

    Remote servers choose their own artifact location (None).
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def _param_text(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_VAL_LENGTH]

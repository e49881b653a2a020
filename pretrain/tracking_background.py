"""Rank 0's tracker: the training loop enqueues, a thread talks to MLflow.

`log_metrics` is a `put_nowait` into a bounded queue, so no step ever waits
for the tracking server, however slow or unreachable it is. The thread sends
the queued steps in batches. When a send fails it warns once, drops what it
holds (every step is in metrics.jsonl already: `RunOutputs` writes the file
first) and retries with backoff; when the server answers again it warns once
more and sends every row of metrics.jsonl past the last step MLflow took,
then goes on from the queue. A full queue does the same. The last step sent
is kept in `<run.dir>/mlflow_sent_step`, so a run resumed while the server
was down (or killed before its backlog was sent) sends the rest later and
the MLflow run ends up with every step.

The only waits of the training process: the start of a fresh run (create the
run, log the params: one MLflow call each, bounded by MLflow's HTTP timeout
and retries, see `pretrain.tracking`) and `close`, which gives the thread at
most `tracking.close_timeout_s` to send what is left, the artifacts and the
final status. A run ends with the status of its training whatever the tracker
did; what MLflow did not get is named in one warning and sent by the next
`mtp train` of the same run directory (for a finished run that is all it does).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from pretrain.tracking import first_line
from pretrain.tracking_mlflow import Tracker

log = logging.getLogger("pretrain.tracking")
# urllib3 warns at every retry MLflow asks it for; the outage is reported once, here.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

QUEUE_STEPS = 10_000  # steps the queue holds before the thread reads them from metrics.jsonl instead
BATCH_STEPS = 50  # rows per send (about 500 metrics, half of MLflow's log_batch limit)
SEND_INTERVAL_S = 5.0  # how long a row may wait in the queue for more to share its request
RETRY_S = (2.0, 60.0)  # first and longest wait between tries while the server is unreachable
CURSOR_NAME = "mlflow_sent_step"


class BackgroundTracker:
    """`Tracker` behind a queue and a thread; the interface `RunOutputs` logs into."""

    def __init__(self, tracker: Tracker, run_dir: Path, resume_step: int | None, close_timeout_s: float):
        self.tracker = tracker
        self.run_id, self.uri = tracker.run_id, tracker.uri
        self.metrics_path = run_dir / "metrics.jsonl"
        self.cursor_path = run_dir / CURSOR_NAME
        self.close_timeout_s = close_timeout_s
        self.sent = self._load_cursor(resume_step)  # every metrics.jsonl row up to this step is in MLflow
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_STEPS)
        self.behind = True  # rows of metrics.jsonl past `sent` may exist that the queue does not hold
        self.down = False
        self.artifacts: list[str] = []
        self.status: str | None = None  # set by close: the thread then finishes the run
        self.finished = threading.Event()
        self.abandoned = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self.thread.start()

    def _load_cursor(self, resume_step: int | None) -> int:
        """The last step MLflow took, never past the resumed step (later rows were trimmed and are redone)."""
        if resume_step is None:
            return 0
        try:
            run_id, step = self.cursor_path.read_text().split()
            if run_id == self.run_id:
                return min(int(step), resume_step)
        except (OSError, ValueError):
            pass
        return resume_step  # a run dir from before the cursor existed: assume MLflow has what was checkpointed

    # ---- the training loop's side: nothing here waits for the network ----------------

    def log_params(self, params: dict) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.queue.put_nowait({"step": step, **metrics})
        except queue.Full:  # the thread reads this step from metrics.jsonl instead
            self.behind = True

    def log_artifact(self, path: str) -> None:
        self.artifacts.append(path)

    def close(self, status: str = "FINISHED") -> str | None:
        """Let the thread send the rest, the artifacts and `status` (at most close_timeout_s); None when it did.

        Otherwise returns one line saying what MLflow is missing.
        """
        self.status = status
        if not self.finished.wait(self.close_timeout_s):
            self.abandoned.set()
            return (f"MLflow at {self.uri} did not take the end of run {self.run_id} within "
                    f"tracking.close_timeout_s={self.close_timeout_s:g}: steps after {self.sent} and the final status "
                    f"{status} are missing there; they are in metrics.jsonl and the next `mtp train` of this run "
                    "directory sends them")
        return None

    # ---- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        wait_s = RETRY_S[0]
        while not self.abandoned.is_set():
            try:
                self.tracker.confirm()
                if self._step():
                    self.finished.set()
                    return
            except Exception as err:  # noqa: BLE001 -- whatever the tracker raises, training goes on
                self._went_down(err)
                self.abandoned.wait(wait_s)
                wait_s = min(2 * wait_s, RETRY_S[1])
                continue
            if self.down:
                self.down = False
                log.warning("MLflow at %s is back; sending the steps it missed from metrics.jsonl", self.uri)
            wait_s = RETRY_S[0]

    def _step(self) -> bool:
        """Send what is due; True once the run is closed and MLflow has everything."""
        if self.behind:
            self.behind = False  # cleared first: a queue overflow from now on sets it again
            self._discard_queue()
            self._send_file_rows()
            return False
        closing = self.status is not None
        rows = self._collect(block=not closing)
        if rows:
            self._send(rows)
            return False
        if closing:
            for path in self.artifacts:
                self.tracker.log_artifact(path)
            self.artifacts.clear()
            self.tracker.terminate(self.status)
            return True
        return False

    def _collect(self, block: bool) -> list[dict]:
        """Rows past `sent` from the queue: waits up to SEND_INTERVAL_S for the first, then takes what is there."""
        rows = []
        deadline = time.monotonic() + (SEND_INTERVAL_S if block else 0)
        while len(rows) < BATCH_STEPS:
            timeout = deadline - time.monotonic()
            try:
                row = self.queue.get(timeout=timeout) if block and timeout > 0 and not rows else self.queue.get_nowait()
            except queue.Empty:
                if not block or rows or time.monotonic() >= deadline or self.status is not None:
                    break
                continue
            if row["step"] > self.sent:
                rows.append(row)
        return rows

    def _send_file_rows(self) -> None:
        """Every complete metrics.jsonl row past `sent`, in batches (a half-written last line is left for later)."""
        batch: list[dict] = []
        try:
            f = open(self.metrics_path)
        except FileNotFoundError:
            return
        with f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    break
                if isinstance(row.get("step"), int) and row["step"] > self.sent:
                    batch.append(row)
                if len(batch) >= BATCH_STEPS:
                    self._send(batch)
                    batch = []
        if batch:
            self._send(batch)

    def _send(self, rows: list[dict]) -> None:
        self.tracker.send(rows)
        self.sent = max(self.sent, rows[-1]["step"])
        self._save_cursor()

    def _save_cursor(self) -> None:
        tmp = self.cursor_path.with_name(f"{CURSOR_NAME}.tmp-{os.getpid()}")
        try:
            tmp.write_text(f"{self.run_id} {self.sent}\n")
            os.replace(tmp, self.cursor_path)
        except OSError as err:  # a full disk ends the run through metrics.jsonl, not here
            log.debug("could not record the last step sent to MLflow: %s", err)

    def _discard_queue(self) -> None:
        """Queued rows are in metrics.jsonl too; after an outage they are read from there, in order."""
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def _went_down(self, err: Exception) -> None:
        self.behind = True
        if not self.down:
            self.down = True
            log.warning("MLflow at %s unreachable (%s); training goes on, the steps are kept in metrics.jsonl and "
                        "sent once it answers again", self.uri, first_line(err))

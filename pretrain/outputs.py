"""Everything a run writes besides checkpoints, opened and closed in one place.

`RunOutputs` owns the run directory's `config.yaml`, `metrics.jsonl`, the
sample audit logs (`samples/dp<r>.jsonl`), the MLflow run, the progress
lines and the final summary. Steps arrive with their losses still on the
device (`add`); `flush` reads every pending step's losses in one host
synchronisation and writes them out, so the training loop never waits for
the GPU just to log. The trainer flushes at logged steps, before each
checkpoint (metrics.jsonl then covers every checkpointed step) and at the end.
MLflow gets each step through a queue (`pretrain.tracking_background`), so
the tracker never stalls a step either.

A write that fails (a full disk, a lost mount) ends the run with one line
naming the file and the step, and exit 1: lines already written stay, a
half-written last line is dropped by the next resume, and the newest
checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.runtime import Runtime
from pretrain.config import RunConfig, config_to_dict, save_config
from pretrain.errors import RunFailure
from pretrain.metrics import MetricsWriter, StepMetrics, format_progress

log = logging.getLogger(__name__)


@dataclass
class PendingStep:
    """A finished step whose losses have not been read from the device yet."""

    step: int
    tokens: int
    loss: torch.Tensor  # []
    head_losses: torch.Tensor  # [n]
    lr: float
    grad_norm: float | torch.Tensor  # read with the losses, in `RunOutputs.flush`
    tokens_per_s: float
    mfu: float | None
    eta_s: float
    extra: dict[str, float] = field(default_factory=dict)


def _data_share(extra: dict[str, float]) -> float | None:
    """The fraction of the step the loader kept this rank waiting."""
    step_s = extra.get("step_s")
    return extra.get("data_wait_s", 0.0) / step_s if step_s else None


class RunOutputs:
    """The run directory's logs and the tracker; rank 0 writes, other ranks only audit their samples."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, step: int, run_id: str | None):
        from pretrain.tracking import make_tracker

        self.cfg = cfg
        self.runtime = runtime
        self.run_dir = Path(cfg.run.dir)
        self.step = step  # the step being written, for error lines
        resume = step if step > 0 else None
        with self._io("config.yaml"):  # before MLflow: a full disk must not leave a run there with no metrics
            if runtime.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, str(self.run_dir / "config.yaml"))
        self.tracker = make_tracker(cfg, runtime.place.rank, run_id, resume)
        self.run_id = getattr(self.tracker, "run_id", None)
        with self._io("metrics.jsonl"):
            self.metrics = self._open_metrics(step, resume) if runtime.is_main else None
        with self._io("samples/"):
            self.samples = self._open_samples(resume)
        self.pending: list[PendingStep] = []
        self.last: StepMetrics | None = None

    @contextlib.contextmanager
    def _io(self, what: str):
        """A failed write of `what` (relative to run.dir) as one line naming it and the step."""
        try:
            yield
        except OSError as err:
            raise RunFailure(
                f"step {self.step}: {err.strerror or err} writing {self.run_dir / what}; nothing older was lost: "
                f"free space (or fix the file system), then re-run the same command to resume from the newest "
                f"complete checkpoint in {self.cfg.checkpoint_dir}"
            ) from None

    def _open_metrics(self, step: int, resume: int | None) -> MetricsWriter:
        if self.run_id:
            (self.run_dir / "mlflow_run_id").write_text(self.run_id + "\n")
        if step == 0:
            self.tracker.log_params(config_to_dict(self.cfg))
        return MetricsWriter(str(self.run_dir / "metrics.jsonl"), resume_step=resume)

    def _open_samples(self, resume: int | None) -> MetricsWriter | None:
        """`samples/dp<r>.jsonl` on the rank that reads each data-parallel replica's batches, if asked for.

        Rank 0 also trims the logs of replicas this layout no longer has (an
        elastic run that lost a node): their rows past the resumed step were
        rolled back, and an audit must not count them.
        """
        place = self.runtime.place
        if not self.cfg.data.log_sample_ids:
            return None
        if self.runtime.is_main and resume is not None:
            for path in (self.run_dir / "samples").glob("dp*.jsonl"):
                if path.stem[2:].isdigit() and int(path.stem[2:]) >= place.dp_size:
                    MetricsWriter(str(path), resume_step=resume).close()
        if not (place.is_first_stage and place.tp_rank == 0):
            return None
        return MetricsWriter(str(self.run_dir / "samples" / f"dp{place.dp_rank}.jsonl"), resume_step=resume)

    def add(self, step: PendingStep, sample_ids: list[int]) -> None:
        self.step = step.step
        if self.samples is not None:
            with self._io(f"samples/dp{self.runtime.place.dp_rank}.jsonl"):
                self.samples.write_row({"step": step.step, "ids": sample_ids})
        self.pending.append(step)

    def flush(self) -> StepMetrics | None:
        """Write every pending step (one device read for all of them); returns the newest, as floats."""
        if not self.pending:
            return self.last
        values = torch.stack([torch.cat([p.loss.reshape(1), p.head_losses]) for p in self.pending]).tolist()
        for pending, row in zip(self.pending, values):
            self.last = StepMetrics(pending.step, pending.tokens, row[0], row[1:], pending.lr,
                                    float(pending.grad_norm), pending.tokens_per_s, mfu=pending.mfu,
                                    extra=pending.extra)
            self._write(self.last, pending.eta_s)
        self.pending.clear()
        return self.last

    def _write(self, record: StepMetrics, eta_s: float) -> None:
        if not self.runtime.is_main:
            return
        self.step = record.step
        with self._io("metrics.jsonl"):
            self.metrics.write(record)
        self.tracker.log_metrics(record.scalars(), step=record.step)
        max_steps = self.cfg.train.max_steps
        if record.step % self.cfg.train.log_interval == 0 or record.step == max_steps:
            print(format_progress(record.step, max_steps, record.loss, record.head_losses, record.tokens_per_s,
                                  eta_s, mfu=record.mfu, memory_gb=record.extra.get("peak_memory_gb"),
                                  data_share=_data_share(record.extra)), flush=True)

    def close(self, status: str, summary: list[str] | None = None) -> None:
        """Flush, end the MLflow run with `status` and close every file; the summary is printed last.

        A run that failed (`summary` None) closes what it can and raises
        nothing more: the error that ended it is the one line the user sees.
        """
        failing = summary is None
        with self._quiet_if(failing), self._io("metrics.jsonl"):
            self.flush()
        for writer, what in ((self.samples, "samples/"), (self.metrics, "metrics.jsonl")):
            if writer is not None:
                with self._quiet_if(failing), self._io(what):
                    writer.close()
        if not self.runtime.is_main:
            return
        if not failing:
            with self._io("head_losses.png"):
                self._log_artifacts()
        missing = self.tracker.close(status)
        if missing:
            log.warning("%s", missing)
        if not failing:
            uri = getattr(self.tracker, "uri", None)
            if uri:
                summary.append(f"MLflow run {self.run_id} in {uri}  (view: mlflow ui --backend-store-uri {uri})")
            print("\n".join(summary), flush=True)

    @staticmethod
    def _quiet_if(failing: bool):
        """While a failed run closes, a second failure (the same full disk) is logged, not raised."""
        if not failing:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def quiet():
            try:
                yield
            except RunFailure as err:
                log.warning("while closing after the failure: %s", err)
        return quiet()

    def _log_artifacts(self) -> None:
        from pretrain.tracking import plot_head_curves

        plot = self.run_dir / "head_losses.png"
        plot_head_curves(str(self.run_dir / "metrics.jsonl"), str(plot))
        for artifact in (self.run_dir / "config.yaml", self.run_dir / "metrics.jsonl", plot):
            self.tracker.log_artifact(str(artifact))

"""Everything a run writes besides checkpoints, opened and closed in one place.

`RunOutputs` owns the run directory's `config.yaml`, `metrics.jsonl`, the
sample audit logs (`samples/dp<r>.jsonl`), the MLflow run, the progress
lines and the final summary. Steps arrive with their losses still on the
device (`add`); `flush` reads every pending step's losses in one host
synchronisation and writes them out, so the training loop never waits for
the GPU just to log. The trainer flushes at logged steps, before each
checkpoint (metrics.jsonl then covers every checkpointed step) and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.runtime import Runtime
from pretrain.config import RunConfig, config_to_dict, save_config
from pretrain.metrics import MetricsWriter, StepMetrics, format_progress


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
        self.tracker = make_tracker(cfg, runtime.place.rank, run_id)
        self.run_id = getattr(self.tracker, "run_id", None)
        resume = step if step > 0 else None
        self.metrics = self._open_metrics(step, resume) if runtime.is_main else None
        self.samples = self._open_samples(resume)
        self.pending: list[PendingStep] = []
        self.last: StepMetrics | None = None

    def _open_metrics(self, step: int, resume: int | None) -> MetricsWriter:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, str(self.run_dir / "config.yaml"))
        if self.run_id:
            (self.run_dir / "mlflow_run_id").write_text(self.run_id + "\n")
        if step == 0:
            self.tracker.log_params(config_to_dict(self.cfg))
        return MetricsWriter(str(self.run_dir / "metrics.jsonl"), resume_step=resume)

    def _open_samples(self, resume: int | None) -> MetricsWriter | None:
        """`samples/dp<r>.jsonl` on the rank that reads each data-parallel replica's batches, if asked for."""
        place = self.runtime.place
        if not (self.cfg.data.log_sample_ids and place.is_first_stage and place.tp_rank == 0):
            return None
        return MetricsWriter(str(self.run_dir / "samples" / f"dp{place.dp_rank}.jsonl"), resume_step=resume)

    def add(self, step: PendingStep, sample_ids: list[int]) -> None:
        if self.samples is not None:
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
        self.metrics.write(record)
        self.tracker.log_metrics(record.scalars(), step=record.step)
        max_steps = self.cfg.train.max_steps
        if record.step % self.cfg.train.log_interval == 0 or record.step == max_steps:
            print(format_progress(record.step, max_steps, record.loss, record.head_losses, record.tokens_per_s,
                                  eta_s, mfu=record.mfu, memory_gb=record.extra.get("peak_memory_gb"),
                                  data_share=_data_share(record.extra)), flush=True)

    def close(self, status: str, summary: list[str] | None = None) -> None:
        """Flush, end the MLflow run with `status` and close every file; the summary is printed last."""
        self.flush()
        if self.samples is not None:
            self.samples.close()
        if not self.runtime.is_main:
            return
        self.metrics.close()
        if summary is not None:
            self._log_artifacts()
        self.tracker.close(status)
        if summary is not None:
            uri = getattr(self.tracker, "uri", None)
            if uri:
                summary.append(f"MLflow run {self.run_id} in {uri}  (view: mlflow ui --backend-store-uri {uri})")
            print("\n".join(summary), flush=True)

    def _log_artifacts(self) -> None:
        from pretrain.tracking import plot_head_curves

        plot = self.run_dir / "head_losses.png"
        plot_head_curves(str(self.run_dir / "metrics.jsonl"), str(plot))
        for artifact in (self.run_dir / "config.yaml", self.run_dir / "metrics.jsonl", plot):
            self.tracker.log_artifact(str(artifact))

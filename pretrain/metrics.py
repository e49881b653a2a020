"""Per-step metrics on disk and the rank-0 progress line.

`metrics.jsonl` is the run's own record, independent of MLflow: one JSON
object per logged step, flushed line by line so a killed job loses at most
the line being written, and trimmed on resume so replayed steps are not
recorded twice.
"""

import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    step: int
    tokens: int  # tokens seen so far, over all data-parallel ranks
    loss: float  # weighted total the optimizer saw
    head_losses: list[float]  # head k predicts token t+k; head 1 is the next-token loss
    lr: float
    grad_norm: float
    tokens_per_s: float
    mfu: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # e.g. val_loss, skipped_steps

    def scalars(self) -> dict[str, float]:
        """Every number by name (`loss_head1..n` for the heads): a metrics.jsonl line minus `step`."""
        out = {"tokens": self.tokens, "loss": self.loss}
        out.update({f"loss_head{k}": v for k, v in enumerate(self.head_losses, start=1)})
        out.update(lr=self.lr, grad_norm=self.grad_norm, tokens_per_s=self.tokens_per_s)
        if self.mfu is not None:
            out["mfu"] = self.mfu
        out.update(self.extra)
        return out


class MetricsWriter:
    """Appends one JSON line per step to `path`.

    `resume_step` None starts a fresh file; an int keeps only the lines of
    steps up to it (a checkpoint's step), dropping the steps the killed job
    ran past its last checkpoint and any half-written last line.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate(resume_step)
        self._file = open(self.path, "a")

    def _truncate(self, resume_step: int) -> None:
        kept, dropped = [], 0
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for line in lines:
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                dropped += 1
                continue
            if isinstance(step, int) and step <= resume_step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            log.info("%s: dropped %d lines past the resumed step %d", self.path, dropped, resume_step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, metrics: StepMetrics) -> None:
        self.write_row({"step": metrics.step, **metrics.scalars()})

    def write_row(self, row: dict) -> None:
        """One step's line; `row["step"]` is what a resume trims by."""
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Throughput:
    """Tokens per second over the last `window` updates, and the time left at that pace.

    A window rather than the run's average, so the first steps' compilation
    and warm-up stop counting once they leave it.
    """

    def __init__(self, window: int = 20, clock=time.monotonic):
        self.clock = clock
        self.points: deque[tuple[float, int, int]] = deque(maxlen=window + 1)

    def update(self, step: int, tokens: int) -> None:
        self.points.append((self.clock(), step, tokens))

    @property
    def tokens_per_s(self) -> float:
        if len(self.points) < 2:
            return 0.0
        (t0, _, n0), (t1, _, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, max_steps: int) -> float:
        if len(self.points) < 2:
            return math.inf
        (t0, s0, _), (t1, s1, _) = self.points[0], self.points[-1]
        if s1 <= s0:
            return math.inf
        return (t1 - t0) / (s1 - s0) * (max_steps - s1)


def format_progress(step: int, max_steps: int, loss: float, head_losses: list[float],
                    tokens_per_s: float, eta_s: float, mfu: float | None = None, memory_gb: float | None = None,
                    data_share: float | None = None) -> str:
    """One plain line for a terminal or a SLURM log, e.g.
    `step 120/2000 | loss 2.91 | heads 2.71 2.88 3.02 3.11 | 41k tok/s | mfu 48% | mem 61.2G | data 1% | eta 12m`.

    MFU appears where the device's peak is known (GPUs), memory where it can
    be read, and `data` is the share of the step spent waiting for batches.
    """
    parts = [f"step {step}/{max_steps}", f"loss {loss:.2f}"]
    if len(head_losses) > 1:
        parts.append("heads " + " ".join(f"{h:.2f}" for h in head_losses))
    parts.append(f"{_si(tokens_per_s)} tok/s")
    if mfu is not None:
        parts.append(f"mfu {mfu:.0%}")
    if memory_gb is not None:
        parts.append(f"mem {memory_gb:.1f}G")
    if data_share is not None:
        parts.append(f"data {data_share:.0%}")
    parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


def _si(value: float) -> str:
    """41234 -> "41k", 1.23e6 -> "1.2M": enough digits to compare runs at a glance."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"

"""One interface over both engines: a training step, an evaluation step, and the engine's state.

`Steps.open(cfg, runtime)` builds the model and the DeepSpeed engine of the
run's layout and returns `EngineSteps` (pp=1) or `PipelineSteps` (pp>1);
the trainer calls the same methods on either and never branches on the
layout. Losses come back as tensors on the device: reading them is the
caller's one host synchronisation per logged step.

A training step, pp=1 (`EngineSteps.train_step`):
    for each micro-batch: forward (trunk, then the heads' loss, which runs
    every head's backward itself: pretrain/loss/schedule.py) -> backward
    through the trunk -> at the last micro-batch DeepSpeed averages the
    gradients over data-parallel ranks -> gradient clipping (ours for fp32
    ZeRO-0, see `parallel.engine.own_clipping`; DeepSpeed's inside
    `engine.step()` otherwise) -> `engine.step()` (AdamW, lr schedule, or a
    skipped step when the gradient norm is NaN/inf).
pp>1 (`PipelineSteps.train_step`): DeepSpeed's pipeline schedule runs the
same work over the stages in `engine.train_batch`; the heads' loss runs on
the last stage. The schedule owns the optimizer step, so our clipping (fp32
ZeRO-0 only) runs as the optimizer's pre-step hook, the one place between
DeepSpeed's gradient reduction and its step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.runtime import Runtime
from pretrain.ckpt_writer import PendingFile
from pretrain.config import RunConfig


@dataclass
class StepResult:
    """What one optimizer step reports; tensors stay on the device until logged."""

    loss: torch.Tensor  # [] weighted total the optimizer saw, mean over the global batch
    head_losses: torch.Tensor  # [n] unscaled per-head means; head 1 is the next-token loss
    grad_norm: float | torch.Tensor  # before clipping; NaN/inf when the step was skipped
    skipped: bool  # the optimizer step was skipped (NaN/inf gradient norm)
    data_wait_s: float = 0.0  # time this rank waited for its loader's batches


class Steps:
    """The engine of a run, driven one step at a time."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, model: torch.nn.Module, engine):
        self.cfg = cfg
        self.runtime = runtime
        self.model = model
        self.engine = engine

    @staticmethod
    def open(cfg: RunConfig, runtime: Runtime, pretrained: Mapping[str, torch.Tensor] | None = None) -> Steps:
        """The model (seeded, or `pretrained` logical tensors where given) under the layout's engine."""
        from parallel.engine import build_engine, build_model

        model = build_model(cfg, runtime, pretrained)
        engine = build_engine(model, cfg, runtime)
        cls = PipelineSteps if cfg.parallel.pp > 1 else EngineSteps
        return cls(cfg, runtime, model, engine)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    def grad_norm(self) -> float | torch.Tensor:
        from parallel.engine import grad_norm

        return grad_norm(self.engine)

    def train_step(self, batches, step: int) -> StepResult:
        raise NotImplementedError

    def eval_step(self, batches, n_batches: int, step: int) -> torch.Tensor:
        """Every head's mean loss [n] over `n_batches` validation micro-batches and data-parallel ranks."""
        raise NotImplementedError

    # ---- state -------------------------------------------------------------------

    def save(self, directory: str, tag: str) -> list[PendingFile]:
        """This rank's engine files (weights, fp32 masters, Adam moments) and shard description, unwritten.

        DeepSpeed's `save_checkpoint` runs (its collectives included) but
        writes nothing: `pretrain.ckpt_writer` writes what it returns, now or
        from host copies in the background (parallel/ckpt_engine.py says why).
        """
        from parallel.ckpt_engine import capture_checkpoint
        from parallel.reshard import layout_file

        files = capture_checkpoint(self.engine, directory, tag).files
        layout = layout_file(directory, self.engine, self.runtime.place)
        return files + ([layout] if layout is not None else [])

    def load(self, directory: str, tag: str, reshard: bool) -> None:
        """Load a checkpoint: DeepSpeed's loader for the layout that wrote it, our reshard for any other.

        Ranks read their files at the file system's pace and DeepSpeed's
        loader meets at barriers, so every group waits `checkpoint.timeout_s`
        meanwhile, not the short step timeout.
        """
        from parallel.engine import apply_collective_timeout
        from parallel.reshard import load_resharded

        apply_collective_timeout(self.cfg.checkpoint.timeout_s)
        try:
            if reshard:
                load_resharded(directory, self.engine, self.runtime.place)
            else:
                self.engine.load_checkpoint(directory, tag=tag)
        finally:
            apply_collective_timeout(self.cfg.fault.collective_timeout_s)


class EngineSteps(Steps):
    """pp=1: MTPModel under DeepSpeed's engine, micro-batches driven here."""

    def train_step(self, batches, step: int) -> StepResult:
        self.model.train()
        skipped_before = self.engine.skipped_steps
        n_micro = self.engine.gradient_accumulation_steps()
        sums = torch.zeros(1 + self.cfg.model.n_future, device=self.runtime.device)  # [1 + n]
        clock = DataClock(batches)
        for _ in range(n_micro):
            batch = self.runtime.to_device(next(clock))
            loss, head_losses = self.engine(batch["input_ids"], batch["labels"], step=step)
            self.engine.backward(loss)  # the last micro-batch's backward averages gradients over dp
            if self.engine.is_gradient_accumulation_boundary() and self.engine.mtp_clip is not None:
                self.engine.mtp_clip(self.engine.optimizer)
            self.engine.step()
            sums += torch.cat([loss.detach().reshape(1), head_losses.detach()]).float()
        means = _dp_mean(sums / n_micro, self.runtime)
        return StepResult(means[0], means[1:], self.grad_norm(), self.engine.skipped_steps > skipped_before,
                          clock.waited_s)

    @torch.no_grad()
    def eval_step(self, batches, n_batches: int, step: int) -> torch.Tensor:
        self.model.eval()
        total = torch.zeros(self.cfg.model.n_future, device=self.runtime.device)
        for _ in range(n_batches):
            batch = self.runtime.to_device(next(batches))
            _, head_losses = self.model(batch["input_ids"], batch["labels"], step=step)
            total += head_losses.float()
        return _dp_mean(total / n_batches, self.runtime)


class PipelineSteps(Steps):
    """pp>1: MTPPipeline under DeepSpeed's pipeline engine; only the first and last stages read batches."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, model: torch.nn.Module, engine):
        super().__init__(cfg, runtime, model, engine)
        if engine.mtp_clip is not None:  # see the module docstring: the schedule owns the optimizer step
            clip = engine.mtp_clip
            engine.optimizer.register_step_pre_hook(lambda optimizer, _args, _kwargs: clip(optimizer))

    def train_step(self, batches, step: int) -> StepResult:
        from parallel.pipeline import reduce_head_losses

        skipped_before = self.engine.skipped_steps
        self.model.step = step
        clock = DataClock(batches) if batches is not None else None
        self.engine.train_batch(_pairs(clock, self.runtime) if clock is not None else None)
        means = reduce_head_losses(self.model, self.runtime.place.dp_size, self.runtime.device)
        return StepResult(means[0], means[1:], self.grad_norm(), self.engine.skipped_steps > skipped_before,
                          clock.waited_s if clock is not None else 0.0)

    def eval_step(self, batches, n_batches: int, step: int) -> torch.Tensor:
        from parallel.pipeline import reduce_head_losses

        self.model.step = step
        self.engine.eval_batch(_pairs(batches, self.runtime) if batches is not None else None,
                               num_micro_batches=n_batches)
        return reduce_head_losses(self.model, self.runtime.place.dp_size, self.runtime.device)[1:]


class DataClock:
    """An iterator over `batches` that adds up how long each `next` waited (the loader's time on the step)."""

    def __init__(self, batches):
        self.batches = batches
        self.waited_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited_s += time.perf_counter() - start


def _dp_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Average over data-parallel ranks, so rank 0 logs the global batch's losses (no host sync)."""
    from megatron.core import parallel_state

    if runtime.place.dp_size == 1:
        return values
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values / runtime.place.dp_size


def _pairs(batches, runtime: Runtime):
    """Loader dicts as the ((input_ids, labels), labels) DeepSpeed's pipeline engine reads (parallel/pipeline.py)."""
    for batch in batches:
        batch = runtime.to_device(batch)
        yield (batch["input_ids"], batch["labels"]), batch["labels"]

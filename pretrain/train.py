"""`mtp train`: the training loop.

The loop is deliberately plain: read one global batch as micro-batches,
forward/backward each through the DeepSpeed engine, step, record. All
parallel plumbing lives in `parallel/`; everything that makes a run
restartable (checkpoint, data cursor, RNG, MLflow run id) is saved together
so that re-running the same command continues exactly where it stopped.
"""

import logging
import os
import sys
import time
from dataclasses import asdict

import torch.distributed as dist

from data_pipeline.feed import source_metrics, source_specs, tokenizer_location, validation_metrics, weighted_validation
from data_pipeline.tokenizer import load_tokenizer
from parallel.runtime import Runtime
from parallel.runtime import start as start_runtime
from parallel.topology import layout_record
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, save_config
from pretrain.errors import RunFailure, UserError
from pretrain.evaluation.periodic import due as eval_due
from pretrain.evaluation.periodic import evaluate_checkpoint
from pretrain.faults import FaultInjector, from_env
from pretrain.metrics import StepMetrics, Throughput
from pretrain.model.config import NOT_IDENTITY
from pretrain.outputs import PendingStep, RunOutputs
from pretrain.runlock import RunLock, hold_run_dir
from pretrain.signals import StopFlag, announce_ready
from pretrain.startup import prepare

log = logging.getLogger("mtp.train")


class Trainer:
    """One training run: the loop, resume, checkpoints; the engine behind `parallel.steps.Steps`."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, run_lock: RunLock | None = None, from_scratch: bool = False):
        from parallel.steps import Steps

        self.cfg = cfg
        self.runtime = runtime
        self.place = runtime.place
        self.tokenizer = load_tokenizer(tokenizer_location(cfg.data))
        self.store = ckpt.CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.keep)
        self.faults = _fault_injector(self.place.rank)
        self.from_scratch = from_scratch
        self.found = self._newest_checkpoint()  # decided before the model: a fresh run may start pretrained
        self.steps = Steps.open(cfg, runtime, self._pretrained())
        self.faults.poison(self.steps.model, lambda: self.step + 1)
        # Pipeline stages between the first and the last never see a batch.
        self.loader = self._loader("train") if self.place.feeds_data else None
        self.stop = StopFlag(runtime.control_group, run_lock)
        self.step = 0
        self.tokens = 0
        self.run_id: str | None = None
        self.last_val: list[float] | None = None
        self.val_by_source: dict[str, list[float]] = {}  # every head's validation loss, per data source
        self.skipped_in_row = 0  # consecutive optimizer steps skipped for a NaN/inf loss or gradient

    def _loader(self, split: str, source: str | None = None):
        from data_pipeline.feed import open_loader

        cfg = self.cfg
        return open_loader(cfg.data, split, cfg.train.seq_len, cfg.model.n_future, cfg.train.micro_batch_size,
                           cfg.train.global_batch_size, self.place.dp_rank, self.place.dp_size, source=source)

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    # ---- resume -------------------------------------------------------------

    def _newest_checkpoint(self) -> tuple[str, dict] | None:
        """(path, extra) of the newest checkpoint whole on every rank, agreed by all; None: a fresh run.

        Checkpoints that exist but are all damaged refuse the run (UserError)
        unless `--from-scratch` moves them aside (pretrain/ckpt_resume.py).
        """
        from pretrain.ckpt_resume import choose, start_over
        from pretrain.ckpt_save import CheckpointSaver

        self.saver = CheckpointSaver(self.cfg, self.runtime, self.store, self.faults)
        if self.from_scratch:
            start_over(self.store, self.saver.group, self.cfg.run.dir)
            return None
        return choose(self.store, self.saver.group)

    def _pretrained(self):
        """`model.init_from`'s logical weights for a fresh run (read lazily, each rank its own slices)."""
        if self.found is not None or not self.cfg.model.init_from:
            return None
        from pretrain.hf.load import pretrained_state

        heads = "copies of its last layer" if self.cfg.model.init_extra_heads == "last_layer" else "random"
        self._print(f"initialising from {self.cfg.model.init_from}; heads 2..{self.cfg.model.n_future}: {heads}")
        return pretrained_state(self.cfg.model, self.tokenizer)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if there is one."""
        if self.found is None:
            return
        path, extra = self.found
        self._check_same_model(extra)
        saved, here = extra.get("layout"), layout_record(self.cfg, self.place)
        reshard = saved is not None and saved != here
        if reshard:
            self._print(f"resharding {path}: saved as {_layout_text(saved)}, running as {_layout_text(here)}")
        try:
            self.steps.load(path, ckpt.ENGINE_TAG, reshard)
        except RuntimeError as err:
            if not _is_timeout(err):
                raise
            raise self._load_timed_out(path) from None
        ckpt.load_rng_state(path, self.place.rank, self.runtime.device)
        if self.loader is not None:
            self.loader.load_state_dict(extra["data"])
        self.step, self.tokens, self.run_id = extra["step"], extra["tokens"], extra.get("mlflow_run_id")
        self._print(f"resumed from {path} at step {self.step}")

    def _load_timed_out(self, path: str) -> RunFailure:
        from pathlib import Path

        from pretrain.ckpt_group import timeout_message

        survey = ckpt.check_metadata(Path(path))
        return RunFailure(timeout_message(self.place.rank, f"loading {path}", self.cfg.checkpoint.timeout_s,
                                          survey.nbytes, survey.nbytes // self.place.world_size))

    def _check_same_model(self, extra: dict) -> None:
        saved = {k: v for k, v in (extra.get("model") or {}).items() if k not in NOT_IDENTITY}
        here = {k: v for k, v in asdict(self.cfg.model).items() if k not in NOT_IDENTITY}
        if saved and saved != here:
            changed = sorted(k for k in saved if saved[k] != here.get(k))
            raise UserError(
                f"the checkpoints in {self.cfg.checkpoint_dir} are of a different model "
                f"(model.{', model.'.join(changed)} differ); use a new run.dir or the original model settings"
            )

    # ---- evaluation -----------------------------------------------------------

    def evaluate(self) -> list[float]:
        """Every head's validation loss, weighted over the data sources; per source in `val_by_source`."""
        self.val_by_source = {s.name: self._evaluate_source(s.name) for s in source_specs(self.cfg.data)}
        return weighted_validation(self.cfg.data, self.val_by_source)

    def _evaluate_source(self, source: str) -> list[float]:
        """Every head's mean loss on the first `eval_steps` validation micro-batches of `source` (dp mean).

        Every rank loops over the same sources, so pipeline stages without a
        loader take part in each source's evaluation in step.
        """
        batches = iter(self._loader("val", source)) if self.place.feeds_data else None
        return self.steps.eval_step(batches, self.cfg.train.eval_steps, self.step).tolist()

    # ---- checkpoints ----------------------------------------------------------

    def save(self, wait: bool = False) -> None:
        """Checkpoint this step: every rank writes its own files, rank 0 seals (pretrain/ckpt_save.py).

        With `checkpoint.async` the files are written in the background
        unless `wait` (a stop, the end of training).
        """
        def engine_files(tmp: str) -> list:
            rng = ckpt.rng_state_file(tmp, self.place.rank, self.runtime.device)
            return [*self.steps.save(tmp, ckpt.ENGINE_TAG), rng]

        def main_files(tmp: str) -> None:
            save_config(self.cfg, os.path.join(tmp, "config.yaml"))
            self.tokenizer.save(os.path.join(tmp, "tokenizer"))

        extra = {
            "step": self.step, "tokens": self.tokens, "data": self.loader.state_dict(),
            "mlflow_run_id": self.run_id, "model": asdict(self.cfg.model),
            "layout": layout_record(self.cfg, self.place),
        } if self.is_main else None
        self.saver.save(self.step, engine_files, main_files, extra, wait)

    # ---- the loop -------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> int:
        """Train to `train.max_steps`, or for `stop_after` more steps, or until a stop signal."""
        cfg = self.cfg
        self.faults.at("resume")
        self.resume()
        last_step = min(cfg.train.max_steps, self.step + stop_after) if stop_after else cfg.train.max_steps
        outputs = RunOutputs(cfg, self.runtime, self.step, self.run_id)
        self.run_id = outputs.run_id
        try:
            early_stop = self.stop.agreed()  # a stop during start-up or resume: the newest checkpoint is all there is
            if early_stop:
                self._print(f"stop signal received before training: nothing new to checkpoint (step {self.step}), "
                            "exiting")
            else:
                self._loop(last_step, outputs)
                self.saver.wait(self.step, "end of training")
            self.stop.settle()
            self.faults.at("end")
            val = None if early_stop else self.last_val or self.evaluate()
        except Exception as err:
            self.saver.close()
            outputs.close("FAILED")
            if _is_timeout(err):
                raise self._timed_out() from err
            if _is_peer_lost(err):
                raise self._peer_lost(err) from err
            raise
        self.saver.close()
        # Every rank's part ends here; what is left is rank 0's: its wait for MLflow (up to
        # tracking.close_timeout_s) must not hold the others in a collective that times out.
        dist.barrier()
        outputs.close("FINISHED" if self.step >= cfg.train.max_steps else "KILLED", self._summary(val))
        return 0

    def _loop(self, last_step: int, outputs: RunOutputs) -> None:
        cfg = self.cfg
        throughput = Throughput()
        throughput.update(self.step, self.tokens)
        step_ids: list[int] = []  # window ids this rank trains on in the step in flight
        batches = _recorded(iter(self.loader), step_ids) if self.loader is not None else None
        while self.step < last_step:
            self.faults.before_step(self.step + 1)
            lr = self.steps.lr
            started = time.perf_counter()
            result = self.steps.train_step(batches, self.step)
            self.step += 1
            self.tokens += cfg.train.global_batch_size * cfg.train.seq_len
            throughput.update(self.step, self.tokens)
            pending = PendingStep(self.step, self.tokens, result.loss, result.head_losses, lr, result.grad_norm,
                                  throughput.tokens_per_s, self._mfu(throughput.tokens_per_s),
                                  throughput.eta_s(cfg.train.max_steps),
                                  extra=self._step_extra(result, time.perf_counter() - started))
            self._maybe_evaluate(pending)
            outputs.add(pending, step_ids[:])
            step_ids.clear()
            if result.skipped:
                self._count_skip(outputs.flush())
            else:
                self.skipped_in_row = 0
            self.saver.poll(self.step)  # seals a background save once every rank's files are written
            stopping = self.stop.agreed()
            checkpointing = stopping or self.step % cfg.checkpoint.interval == 0 or self.step == last_step
            if checkpointing or self.step % cfg.train.log_interval == 0:
                outputs.flush()  # the one host synchronisation for the steps since the last flush
            if checkpointing:
                # Evaluation reads the checkpoint from disk: an asynchronous save is sealed first.
                self.save(wait=stopping or self.step == last_step or eval_due(cfg, self.step))
                stopping = stopping or self.stop.agreed()  # a stop during the write: this checkpoint is the one
                if not stopping:  # eval.suites every eval.interval steps, on the checkpoint just saved
                    evaluate_checkpoint(cfg, self.step, self.runtime)
            if stopping:
                self._print(f"stop signal received: checkpointed step {self.step}, exiting")
                break

    def _count_skip(self, record: StepMetrics) -> None:
        """Count a step the engine skipped for a NaN/inf gradient; too many in a row end the run.

        Every rank sees the same decision (the norm is global), so every rank
        raises together and none waits in a collective.
        """
        self.skipped_in_row += 1
        limit = self.cfg.fault.max_skipped_steps
        what = f"step {self.step}: loss {record.loss:.4g}, gradient norm {record.grad_norm:.4g}"
        if self.skipped_in_row > limit:
            raise RunFailure(
                f"{what}: {self.skipped_in_row} steps in a row with a NaN/inf loss or gradient "
                f"(fault.max_skipped_steps={limit}); the weights are those before them and the newest "
                f"checkpoint is in {self.cfg.checkpoint_dir}: lower optimizer.lr or fix the data, then re-run"
            )
        log.warning("%s: NaN/inf loss or gradient, optimizer step skipped (%d in a row, limit fault.max_skipped_steps=%d)",
                    what, self.skipped_in_row, limit)

    def _timed_out(self) -> RunFailure:
        """One line naming the setting for a collective's timeout (exit 1, so torchrun restarts the group)."""
        return RunFailure(
            f"rank {self.place.rank}, step {self.step + 1}: a collective did not finish within "
            f"fault.collective_timeout_s={self.cfg.fault.collective_timeout_s}s (a peer rank hung or died); "
            "exiting so the launcher restarts the group from the newest checkpoint"
        )

    def _peer_lost(self, err: Exception) -> RunFailure:
        """A peer process died (lost node, killed worker): one line, exit 1, so the launcher re-forms the group."""
        return RunFailure(
            f"rank {self.place.rank}, step {self.step + 1}: a peer rank is gone ({_first_line(err)}); exiting so "
            "the launcher re-forms the group (with the nodes left, if elastic) from the newest checkpoint"
        )

    def _maybe_evaluate(self, pending: PendingStep) -> None:
        interval = self.cfg.train.eval_interval
        if interval and (self.step % interval == 0 or self.step == self.cfg.train.max_steps):
            val = self.last_val = self.evaluate()
            pending.extra.update({f"val_loss_head{k}": v for k, v in enumerate(val, start=1)})
            pending.extra["val_loss"] = sum(val) / len(val)
            pending.extra.update(validation_metrics(self.val_by_source))
            self._print(f"eval step {self.step} | val heads " + " ".join(f"{v:.3f}" for v in val))

    def _summary(self, val: list[float] | None) -> list[str]:
        lines = [f"run {self.cfg.run.dir}: {self.step} steps, {self.tokens} tokens"]
        if val is not None:
            lines.append("validation loss per head: " + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(val, start=1)))
        return lines

    def _step_extra(self, result, step_s: float) -> dict[str, float]:
        """Per-step figures beside the losses: skips, host time of the step and its data wait, peak memory.

        `step_s` is the host's view: without a synchronisation in the step it
        can run ahead of the GPU, but every optimizer step already waits for
        the gradient norm, so over a logged interval it follows the device.
        """
        extra = {"skipped_steps": float(self.steps.skipped_steps), "step_s": step_s,
                 "data_wait_s": result.data_wait_s}
        if self.loader is not None:
            extra.update(source_metrics(self.loader))  # tokens consumed per data source
        peak = self.runtime.peak_memory_bytes()
        if peak is not None:
            extra["peak_memory_gb"] = peak / 2**30
        return extra

    def _mfu(self, tokens_per_s: float) -> float | None:
        from parallel.hardware import peak_flops
        from pretrain.model.counting import flops_per_token

        peak = peak_flops(self.runtime.device_name(), self.runtime.dtype_name)
        if peak is None or tokens_per_s <= 0:
            return None
        achieved = flops_per_token(self.cfg.model, self.cfg.train.seq_len) * tokens_per_s
        return achieved / (peak * self.place.world_size)

    def _print(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)


def _is_timeout(err: Exception) -> bool:
    """gloo says "Timed out waiting ...", NCCL's watchdog "... timeout": both are RuntimeErrors."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def _is_peer_lost(err: Exception) -> bool:
    """gloo's words for a peer process that died mid-collective."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        words in text for words in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _recorded(batches, ids: list[int]):
    """Pass batches through, appending each one's window ids to `ids`."""
    for batch in batches:
        ids.extend(batch["sample_ids"].tolist())
        yield batch


def _fault_injector(rank: int) -> FaultInjector:
    return FaultInjector(from_env(), rank)


def _layout_text(layout: dict) -> str:
    return f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} zero_stage={layout['zero_stage']}"


def run(args, cfg: RunConfig | None = None) -> int:
    """`mtp train`: the checked config (`pretrain.startup`), then the runtime and trainer under the run-dir lock."""
    cfg = cfg or prepare(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_lock = hold_run_dir(cfg.run.dir, cfg.fault.lock_timeout_s)  # rank 0; before anything in run.dir is touched
    try:
        runtime = start_runtime(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dtype,
                                cfg.fault.collective_timeout_s, seed=cfg.train.seed, kernels=cfg.model.kernels,
                                sequence_parallel=cfg.parallel.sequence_parallel)
        if runtime.is_main:
            print(f"runtime: {runtime.place.world_size} process(es) on {runtime.device_name()} ({runtime.backend}), "
                  f"{runtime.dtype_name}, {runtime.kernels} kernels"
                  f"{', sequence-parallel' if cfg.parallel.sequence_parallel else ''}", flush=True)
            announce_ready()  # every rank is up with its stop handlers: the batch script may deliver a held stop
        _fault_injector(runtime.place.rank).at("start")
        if StopFlag(runtime.control_group, run_lock).agreed():
            if runtime.is_main:
                print("stop signal received during start-up: nothing to checkpoint yet, exiting", flush=True)
            return 0
        return Trainer(cfg, runtime, run_lock, args.from_scratch).fit(stop_after=args.stop_after)
    finally:
        if run_lock is not None:
            run_lock.release()

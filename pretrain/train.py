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
from dataclasses import asdict

import torch.distributed as dist

from data_pipeline.tokenizer import load_tokenizer
from parallel.runtime import Runtime
from parallel.runtime import start as start_runtime
from parallel.topology import layout_record
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, check_data_dir, load_config, save_config, validate
from pretrain.errors import RunFailure, UserError
from pretrain.faults import FaultInjector, from_env
from pretrain.metrics import StepMetrics, Throughput
from pretrain.outputs import PendingStep, RunOutputs
from pretrain.signals import StopFlag

log = logging.getLogger("mtp.train")


class Trainer:
    """One training run: the loop, resume, checkpoints; the engine behind `parallel.steps.Steps`."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, from_scratch: bool = False):
        from parallel.steps import Steps

        self.cfg = cfg
        self.runtime = runtime
        self.place = runtime.place
        self.tokenizer = load_tokenizer(cfg.data.dir)
        self.store = ckpt.CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.keep)
        self.faults = _fault_injector(self.place.rank)
        self.from_scratch = from_scratch
        self.found = self._newest_checkpoint()  # decided before the model: a fresh run may start pretrained
        self.steps = Steps.open(cfg, runtime)
        self.faults.poison(self.steps.model, lambda: self.step + 1)
        # Pipeline stages between the first and the last never see a batch.
        self.loader = self._loader("train") if self.place.feeds_data else None
        self.stop = StopFlag(runtime.control_group)
        self.step = 0
        self.tokens = 0
        self.run_id: str | None = None
        self.last_val: list[float] | None = None
        self.skipped_in_row = 0  # consecutive optimizer steps skipped for a NaN/inf loss or gradient

    def _loader(self, split: str):
        from data_pipeline.loader import StreamingLoader

        cfg = self.cfg
        return StreamingLoader(
            cfg.data.dir, split, cfg.train.seq_len, cfg.model.n_future,
            cfg.train.micro_batch_size, cfg.train.global_batch_size,
            dp_rank=self.place.dp_rank, dp_size=self.place.dp_size, seed=cfg.data.seed,
            num_workers=cfg.data.num_workers, on_bad_shard=cfg.data.on_bad_shard,
        )

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
        saved = extra.get("model")
        if saved is not None and saved != asdict(self.cfg.model):
            changed = sorted(k for k in saved if saved[k] != asdict(self.cfg.model).get(k))
            raise UserError(
                f"the checkpoints in {self.cfg.checkpoint_dir} are of a different model "
                f"(model.{', model.'.join(changed)} differ); use a new run.dir or the original model settings"
            )

    # ---- evaluation -----------------------------------------------------------

    def evaluate(self) -> list[float]:
        """Every head's mean loss on the first `eval_steps` validation micro-batches (dp mean)."""
        batches = iter(self._loader("val")) if self.place.feeds_data else None
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
        self.resume()
        last_step = min(cfg.train.max_steps, self.step + stop_after) if stop_after else cfg.train.max_steps
        outputs = RunOutputs(cfg, self.runtime, self.step, self.run_id)
        self.run_id = outputs.run_id
        try:
            self._loop(last_step, outputs)
            self.saver.wait(self.step, "end of training")
            self.stop.settle()
            val = self.last_val or self.evaluate()
        except Exception as err:
            self.saver.close()
            outputs.close("FAILED")
            if _is_timeout(err):
                raise self._timed_out() from err
            raise
        self.saver.close()
        outputs.close("FINISHED" if self.step >= cfg.train.max_steps else "KILLED", self._summary(val))
        dist.barrier()
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
            result = self.steps.train_step(batches, self.step)
            self.step += 1
            self.tokens += cfg.train.global_batch_size * cfg.train.seq_len
            throughput.update(self.step, self.tokens)
            pending = PendingStep(self.step, self.tokens, result.loss, result.head_losses, lr, result.grad_norm,
                                  throughput.tokens_per_s, self._mfu(throughput.tokens_per_s),
                                  throughput.eta_s(cfg.train.max_steps),
                                  extra={"skipped_steps": float(self.steps.skipped_steps)})
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
                self.save(wait=stopping or self.step == last_step)
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

    def _maybe_evaluate(self, pending: PendingStep) -> None:
        interval = self.cfg.train.eval_interval
        if interval and (self.step % interval == 0 or self.step == self.cfg.train.max_steps):
            val = self.last_val = self.evaluate()
            pending.extra.update({f"val_loss_head{k}": v for k, v in enumerate(val, start=1)})
            pending.extra["val_loss"] = sum(val) / len(val)
            self._print(f"eval step {self.step} | val heads " + " ".join(f"{v:.3f}" for v in val))

    def _summary(self, val: list[float]) -> list[str]:
        return [
            f"run {self.cfg.run.dir}: {self.step} steps, {self.tokens} tokens",
            "validation loss per head: " + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(val, start=1)),
        ]

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


def _recorded(batches, ids: list[int]):
    """Pass batches through, appending each one's window ids to `ids`."""
    for batch in batches:
        ids.extend(batch["sample_ids"].tolist())
        yield batch


def _fault_injector(rank: int) -> FaultInjector:
    try:
        return FaultInjector(from_env(), rank)
    except ValueError as err:
        raise UserError(f"{err}; unset MTP_FAULT for a normal run") from None


def _layout_text(layout: dict) -> str:
    return f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} zero_stage={layout['zero_stage']}"


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    check_data_dir(cfg)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    tokenizer = load_tokenizer(cfg.data.dir)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    runtime = start_runtime(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dtype, cfg.fault.collective_timeout_s,
                            seed=cfg.train.seed)
    return Trainer(cfg, runtime, from_scratch=args.from_scratch).fit(stop_after=args.stop_after)

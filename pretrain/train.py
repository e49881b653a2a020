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
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, check_data_dir, config_to_dict, load_config, save_config, validate
from pretrain.errors import RunFailure, UserError
from pretrain.evaluation.periodic import evaluate_checkpoint
from pretrain.faults import FaultInjector, from_env
from pretrain.metrics import MetricsWriter, StepMetrics, Throughput, format_progress
from pretrain.signals import StopFlag
from pretrain.tracking import make_tracker, plot_head_curves

log = logging.getLogger("mtp.train")


class Trainer:
    def __init__(self, cfg: RunConfig):
        from data_pipeline.tokenizer import load_tokenizer
        from parallel.engine import build_engine, build_model, init_distributed

        self.cfg = cfg
        self.place = init_distributed(cfg)
        self.tokenizer = load_tokenizer(cfg.data.dir)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        self.pipelined = cfg.parallel.pp > 1
        self.model = build_model(cfg, self.place)
        self.engine = build_engine(self.model, cfg, self.place)
        self.faults = _fault_injector(self.place.rank)
        self.faults.poison(self.model, lambda: self.step + 1)
        # Pipeline stages between the first and the last never see a batch.
        self.loader = self._loader("train") if self.place.feeds_data else None
        self.store = ckpt.CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.keep)
        self.stop = StopFlag()
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
        return self.place.rank == 0

    # ---- resume -------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, chosen on rank 0 for everyone."""
        found = [self.store.latest() if self.is_main else None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return
        path, extra = found[0]
        self._check_same_model(extra)
        self._load_engine(path, extra.get("layout"))
        ckpt.load_rng_state(path, self.place.rank)
        if self.loader is not None:
            self.loader.load_state_dict(extra["data"])
        self.step, self.tokens, self.run_id = extra["step"], extra["tokens"], extra.get("mlflow_run_id")
        self._print(f"resumed from {path} at step {self.step}")

    def _load_engine(self, path: str, saved_layout: dict | None) -> None:
        """DeepSpeed's loader for the layout that wrote the checkpoint, our reshard for any other."""
        from parallel.reshard import layout_record, load_resharded

        here = layout_record(self.cfg, self.place)
        if saved_layout is None or saved_layout == here:
            self.engine.load_checkpoint(path, tag=ckpt.ENGINE_TAG)
            return
        self._print(f"resharding {path}: saved as {_layout_text(saved_layout)}, running as {_layout_text(here)}")
        load_resharded(path, self.engine, self.place)

    def _check_same_model(self, extra: dict) -> None:
        from dataclasses import asdict

        saved = extra.get("model")
        if saved is not None and saved != asdict(self.cfg.model):
            changed = sorted(k for k in saved if saved[k] != asdict(self.cfg.model).get(k))
            raise UserError(
                f"the checkpoints in {self.cfg.checkpoint_dir} are of a different model "
                f"(model.{', model.'.join(changed)} differ); use a new run.dir or the original model settings"
            )

    # ---- one step -----------------------------------------------------------

    def train_step(self, batches) -> tuple[float, list[float], float]:
        """One optimizer step over this rank's micro-batches; returns (loss, head losses, grad norm)."""
        from parallel.engine import grad_norm

        if self.pipelined:
            return self._pipeline_step(batches)
        self.model.train()
        loss_sum, heads_sum = 0.0, None
        n_micro = self.loader.micro_batches_per_step
        for _ in range(n_micro):
            batch = self._to_device(next(batches))
            loss, head_losses = self.engine(batch["input_ids"], batch["labels"], step=self.step)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += float(loss.detach())
            heads_sum = head_losses.detach().float() if heads_sum is None else heads_sum + head_losses.detach().float()
        means = self._dp_mean(torch.cat([torch.tensor([loss_sum]), heads_sum.cpu()]) / n_micro)
        return float(means[0]), means[1:].tolist(), grad_norm(self.engine)

    def _pipeline_step(self, batches) -> tuple[float, list[float], float]:
        """The pipeline engine runs every micro-batch and the optimizer step; the last stage's losses reach rank 0."""
        from parallel.engine import grad_norm
        from parallel.pipeline import reduce_head_losses

        self.model.step = self.step
        self.engine.train_batch(_pairs(batches) if batches is not None else None)
        means = reduce_head_losses(self.model, self.place.dp_size)
        return means[0], means[1:], grad_norm(self.engine)

    def _to_device(self, batch: dict) -> dict:
        if not torch.cuda.is_available():
            return batch
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}

    def _dp_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average over data-parallel ranks, so rank 0 logs the global batch's loss."""
        from megatron.core import parallel_state

        if self.place.dp_size == 1:
            return values
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        values = values.to(dev)
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        return values.cpu() / self.place.dp_size

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Every head's mean loss on the first `eval_steps` validation micro-batches of this rank."""
        if self.pipelined:
            return self._pipeline_evaluate()
        self.model.eval()
        total = None
        batches = iter(self._loader("val"))
        for _ in range(self.cfg.train.eval_steps):
            batch = self._to_device(next(batches))
            _, head_losses = self.model(batch["input_ids"], batch["labels"], step=self.step)
            total = head_losses.float().cpu() if total is None else total + head_losses.float().cpu()
        return self._dp_mean(total / self.cfg.train.eval_steps).tolist()

    def _pipeline_evaluate(self) -> list[float]:
        from parallel.pipeline import reduce_head_losses

        self.model.step = self.step
        batches = _pairs(iter(self._loader("val"))) if self.place.feeds_data else None
        self.engine.eval_batch(batches, num_micro_batches=self.cfg.train.eval_steps)
        return reduce_head_losses(self.model, self.place.dp_size)[1:]

    # ---- checkpoints ----------------------------------------------------------

    def save(self) -> None:
        """Every rank writes its engine shard into one temp dir; rank 0 seals it (see checkpoint.py)."""
        from dataclasses import asdict

        from parallel.reshard import layout_record, save_layout

        tmp = self.store.begin(self.step) if self.is_main else self.store.tmp_dir(self.step)
        dist.barrier()
        self.engine.save_checkpoint(tmp, tag=ckpt.ENGINE_TAG)
        save_layout(tmp, self.engine, self.place)
        ckpt.save_rng_state(tmp, self.place.rank)
        self.faults.during_save(self.step)
        dist.barrier()
        if self.is_main:
            save_config(self.cfg, os.path.join(tmp, "config.yaml"))
            self.tokenizer.save(os.path.join(tmp, "tokenizer"))
            extra = {
                "step": self.step, "tokens": self.tokens, "data": self.loader.state_dict(),
                "mlflow_run_id": self.run_id, "model": asdict(self.cfg.model),
                "layout": layout_record(self.cfg, self.place),
            }
            final = self.store.commit(tmp, self.step, extra)
            self._print(f"checkpoint {final}")
        dist.barrier()

    # ---- the loop -------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> int:
        """Train to `train.max_steps`, or for `stop_after` more steps, or until a stop signal."""
        cfg = self.cfg
        self.resume()
        last_step = min(cfg.train.max_steps, self.step + stop_after) if stop_after else cfg.train.max_steps
        tracker = make_tracker(cfg, self.place.rank, self.run_id)
        self.run_id = getattr(tracker, "run_id", None)
        metrics = self._start_run_dir(tracker)
        samples = self._sample_log()
        try:
            self._loop(last_step, metrics, samples, tracker)
        except Exception as err:
            for log_file in (metrics, samples):
                if log_file is not None:
                    log_file.close()
            if self.is_main:
                tracker.close("FAILED")
            if _is_timeout(err):
                raise self._timed_out() from err
            raise
        if samples is not None:
            samples.close()
        self.stop.settle()
        self._finish(metrics, tracker, "FINISHED" if self.step >= cfg.train.max_steps else "KILLED")
        return 0

    def _loop(self, last_step: int, metrics, samples, tracker) -> None:
        cfg = self.cfg
        throughput = Throughput()
        throughput.update(self.step, self.tokens)
        step_ids: list[int] = []  # window ids this rank trains on in the step in flight
        batches = _recorded(iter(self.loader), step_ids) if self.loader is not None else None
        while self.step < last_step:
            self.faults.before_step(self.step + 1)
            lr = self.engine.get_lr()[0]
            skipped_before = self.engine.skipped_steps
            loss, heads, norm = self.train_step(batches)
            self.step += 1
            self.tokens += cfg.train.global_batch_size * cfg.train.seq_len
            throughput.update(self.step, self.tokens)
            record = StepMetrics(self.step, self.tokens, loss, heads, lr, norm, throughput.tokens_per_s,
                                 mfu=self._mfu(throughput.tokens_per_s))
            self._check_skip(self.engine.skipped_steps > skipped_before, record)
            if samples is not None:
                samples.write_row({"step": self.step, "ids": step_ids[:]})
            step_ids.clear()
            self._maybe_evaluate(record)
            self._record(record, metrics, tracker, throughput)
            stopping = self.stop.agreed()
            if stopping or self.step % cfg.checkpoint.interval == 0 or self.step == last_step:
                self.save()
                if not stopping:  # eval.suites every eval.interval steps, on the checkpoint just saved
                    evaluate_checkpoint(cfg, self.step, self.place.rank)
            if stopping:
                self._print(f"stop signal received: checkpointed step {self.step}, exiting")
                break

    def _check_skip(self, skipped: bool, record: StepMetrics) -> None:
        """Count a step the engine skipped for a NaN/inf gradient; too many in a row end the run.

        Every rank sees the same decision (see parallel.engine.GradClip), so
        every rank raises together and none waits in a collective.
        """
        record.extra["skipped_steps"] = float(self.engine.skipped_steps)
        if not skipped:
            self.skipped_in_row = 0
            return
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

    def _sample_log(self) -> MetricsWriter | None:
        """`samples/dp<r>.jsonl` on the rank that reads each data-parallel replica's batches, if asked for."""
        place = self.place
        if not (self.cfg.data.log_sample_ids and place.is_first_stage and place.tp_rank == 0):
            return None
        path = Path(self.cfg.run.dir) / "samples" / f"dp{place.dp_rank}.jsonl"
        return MetricsWriter(str(path), resume_step=self.step if self.step > 0 else None)

    def _maybe_evaluate(self, record: StepMetrics) -> None:
        interval = self.cfg.train.eval_interval
        if interval and (self.step % interval == 0 or self.step == self.cfg.train.max_steps):
            val = self.last_val = self.evaluate()
            record.extra.update({f"val_loss_head{k}": v for k, v in enumerate(val, start=1)})
            record.extra["val_loss"] = sum(val) / len(val)
            self._print(f"eval step {self.step} | val heads " + " ".join(f"{v:.3f}" for v in val))

    def _record(self, record: StepMetrics, metrics, tracker, throughput: Throughput) -> None:
        if not self.is_main:
            return
        metrics.write(record)
        tracker.log_metrics(record.scalars(), step=record.step)
        if record.step % self.cfg.train.log_interval == 0 or record.step == self.cfg.train.max_steps:
            eta = throughput.eta_s(self.cfg.train.max_steps)
            self._print(format_progress(record.step, self.cfg.train.max_steps, record.loss,
                                        record.head_losses, record.tokens_per_s, eta))

    def _start_run_dir(self, tracker):
        if not self.is_main:
            return None
        run_dir = Path(self.cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, str(run_dir / "config.yaml"))
        if self.run_id:
            (run_dir / "mlflow_run_id").write_text(self.run_id + "\n")
        if self.step == 0:
            tracker.log_params(config_to_dict(self.cfg))
        resume = self.step if self.step > 0 else None
        return MetricsWriter(str(run_dir / "metrics.jsonl"), resume_step=resume)

    def _finish(self, metrics, tracker, status: str) -> None:
        val = self.last_val or self.evaluate()
        if self.is_main:
            metrics.close()
            run_dir = Path(self.cfg.run.dir)
            plot = run_dir / "head_losses.png"
            plot_head_curves(str(run_dir / "metrics.jsonl"), str(plot))
            for artifact in (run_dir / "config.yaml", run_dir / "metrics.jsonl", plot):
                tracker.log_artifact(str(artifact))
            tracker.close(status)
            self._print(self._summary(tracker, val))
        dist.barrier()

    def _summary(self, tracker, val: list[float]) -> str:
        lines = [
            f"run {self.cfg.run.dir}: {self.step} steps, {self.tokens} tokens",
            "validation loss per head: " + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(val, start=1)),
        ]
        uri = getattr(tracker, "uri", None)
        if uri:
            lines.append(f"MLflow run {self.run_id} in {uri}  (view: mlflow ui --backend-store-uri {uri})")
        return "\n".join(lines)

    def _mfu(self, tokens_per_s: float) -> float | None:
        from parallel.hardware import peak_flops
        from pretrain.model.counting import flops_per_token

        peak = peak_flops(self.cfg.parallel.dtype)
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


def _pairs(batches):
    """Loader dicts as the (inputs, labels) tuples DeepSpeed's pipeline engine reads."""
    for batch in batches:
        yield batch["input_ids"], batch["labels"]


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
    return Trainer(cfg).fit(stop_after=args.stop_after)


"""Saving a checkpoint across ranks: every rank writes its own files, rank 0 seals when all succeeded.

    rank 0: tmp = store.begin(step)                   broadcast: the temp dir exists (or why not)
    every rank: files = engine's files (captured)     DeepSpeed's save_checkpoint, writing nothing
    rank 0: config, tokenizer, extra.json into tmp
    every rank: write + checksum + fsync its files    now (sync), or from host copies in a thread (async)
    gather every rank's RankResult                    checkpoint group, checkpoint.timeout_s
    rank 0: seal (manifest, COMPLETE, rename, keep)   or remove tmp if any rank failed
    broadcast the outcome                             every rank then prints nothing / raises the same line

Asynchronous saves (`checkpoint.async`): the step's state is copied to host
memory and training goes on; each later step asks all ranks, with one tiny
all-reduce, whether every background write is done, and the same step on
every rank then gathers and seals. At most one save is in flight: the next
save, a stop signal and the end of training wait for it (and say so when
they had to). A rank killed mid-write never reports, so the checkpoint is
never sealed and the previous one stays the newest complete one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from parallel.runtime import Runtime
from pretrain.checkpoint import CheckpointStore, name
from pretrain.ckpt_group import CheckpointGroup
from pretrain.ckpt_writer import BackgroundWriter, PendingFile, RankResult, describe_os_error, stage, write_files
from pretrain.config import RunConfig
from pretrain.errors import RunFailure
from pretrain.faults import FaultInjector


@dataclass
class InFlight:
    """The asynchronous save whose files are being written."""

    step: int
    tmp: str
    writer: BackgroundWriter


class CheckpointSaver:
    """One run's checkpoint saves (and, in pretrain/ckpt_resume.py, the choice of where to resume)."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, store: CheckpointStore, faults: FaultInjector):
        place = runtime.place
        self.cfg, self.runtime, self.store, self.faults = cfg, runtime, store, faults
        self.group = CheckpointGroup(cfg.checkpoint.timeout_s, place.rank, place.world_size, runtime.control_group)
        self.asynchronous = cfg.checkpoint.async_ if cfg.checkpoint.async_ is not None else runtime.cuda
        self.in_flight: InFlight | None = None
        self._stager = None

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    def save(self, step: int, engine_files: Callable[[str], list[PendingFile]],
             main_files: Callable[[str], None], extra: dict | None, wait: bool) -> None:
        """Checkpoint `step`. `engine_files(tmp)` runs on every rank (collective, writes nothing);
        `main_files(tmp)` writes rank 0's small files; `wait`: return only once it is sealed."""
        if self.in_flight is not None:
            self.wait(step, f"checkpoint step {step}")
        tmp, problem = self._begin(step)
        files = engine_files(tmp)
        if problem is None and self.is_main:
            problem = self._main_files(tmp, step, main_files, extra)
        if problem is not None:
            self._finish(step, step, tmp, RankResult(self.runtime.place.rank, error=problem))
        elif self.asynchronous and not wait:
            self._start_background(step, tmp, files)
        else:
            self._finish(step, step, tmp, self._write(step, tmp, files))

    def poll(self, step: int) -> None:
        """After every step: seal the save in flight once every rank's background write has finished."""
        if self.in_flight is not None and self.group.all_done(self.in_flight.writer.done()):
            flight, self.in_flight = self.in_flight, None
            self._finish(step, flight.step, flight.tmp, flight.writer.result)

    def wait(self, step: int, why: str) -> None:
        """Block until the save in flight is written everywhere and sealed (before a save, a stop, the end)."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return
        if not self.group.all_done(flight.writer.done()) and self.is_main:
            print(f"{why}: waiting for the checkpoint of step {flight.step}, still being written "
                  f"({time.monotonic() - flight.writer.started:.1f} s so far)", flush=True)
        result = flight.writer.wait(self.cfg.checkpoint.timeout_s)
        if result is None:
            result = RankResult(self.runtime.place.rank, error=f"its files were not written within "
                                f"checkpoint.timeout_s={self.cfg.checkpoint.timeout_s}s (a stalled file system?)")
        self._finish(step, flight.step, flight.tmp, result)

    def close(self) -> None:
        """Release the host copies of asynchronous saves (pinned memory on GPUs)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---- the steps of a save ---------------------------------------------------------

    def _begin(self, step: int) -> tuple[str, str | None]:
        """Rank 0 makes the temp dir, every rank learns that it exists (or why it could not be made)."""
        problem = None
        if self.is_main:
            try:
                self.store.begin(step)
            except OSError as err:
                problem = describe_os_error(err, self.store.tmp_dir(step))
        problem = self.group.broadcast(problem, f"starting checkpoint {name(step)}")
        return self.store.tmp_dir(step), problem

    def _main_files(self, tmp: str, step: int, main_files: Callable[[str], None], extra: dict | None) -> str | None:
        try:
            main_files(tmp)
            self.store.write_extra(tmp, step, extra or {})
        except OSError as err:
            return describe_os_error(err, tmp)
        return None

    def _write(self, step: int, tmp: str, files: list[PendingFile]) -> RankResult:
        return write_files(files, tmp, self.runtime.place.rank, after_first=lambda: self.faults.during_save(step),
                           fail=self.faults.save_error(step))

    def _start_background(self, step: int, tmp: str, files: list[PendingFile]) -> None:
        from pretrain.ckpt_writer import make_stager

        if self._stager is None:
            self._stager = make_stager(pinned=self.runtime.cuda)
        staged = stage(self._stager, files)  # host copies: the next optimizer step may change the originals

        def write(wanted) -> RankResult:
            self.faults.hold_save(step, wanted)
            return self._write(step, tmp, staged)

        self.in_flight = InFlight(step, tmp, BackgroundWriter(write))

    def _finish(self, now: int, step: int, tmp: str, result: RankResult) -> None:
        """Gather every rank's result; seal when all succeeded, else remove the temp dir and fail together."""
        results = self.group.gather(result, f"sealing checkpoint {name(step)}",
                                    (result.nbytes * self.runtime.place.world_size, result.nbytes))
        failed = [r for r in results if r.error]
        outcome: tuple[str | None, str | None] = (None, None)
        if self.is_main:
            outcome = self._seal(step, tmp, results) if not failed else (None, None)
            if failed or outcome[1]:
                self.store.remove_tmp(step)
        final, seal_error = self.group.broadcast(outcome, f"sealing checkpoint {name(step)}")
        if failed or seal_error:
            raise RunFailure(self._failure(now, step, failed, seal_error))
        if self.is_main:
            took = f" (written in the background in {result.write_s:.1f} s)" if now != step else ""
            print(f"checkpoint {final}{took}", flush=True)

    def _seal(self, step: int, tmp: str, results: list[RankResult]) -> tuple[str | None, str | None]:
        try:
            return self.store.seal(tmp, step, [record for r in results for record in r.records]), None
        except OSError as err:
            return None, describe_os_error(err, tmp)

    def _failure(self, now: int, step: int, failed: list[RankResult], seal_error: str | None) -> str:
        """`step S: no space left on device (PATH) on rank R writing checkpoint step_N; the newest ...`."""
        if failed:
            others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            what = f"{failed[0].error} on rank {failed[0].rank}{others} writing checkpoint {name(step)}"
        else:
            what = f"{seal_error} on rank 0 sealing checkpoint {name(step)}"
        newest = self.store.newest_sealed() or "none (nothing was sealed yet)"
        return (f"step {now}: {what}; the newest complete checkpoint is {newest}. The partial checkpoint was "
                "removed and nothing older was touched: fix the cause (free space, or lower checkpoint.keep) and "
                "run the same command again to resume")

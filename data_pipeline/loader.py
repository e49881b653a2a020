"""StreamingLoader: deterministic, resumable micro-batches for one data-parallel rank.

Global batch s is stream positions [s*G, (s+1)*G) after the resume point (see
`order.py` for the stream), whatever the number of ranks. Data-parallel rank r of
R takes the contiguous slice [r*G/R, (r+1)*G/R) of it and cuts it into micro-batches,
so tensor/pipeline peers (same dp_rank) receive identical batches. Nothing here reads
RANK or WORLD_SIZE: the caller passes the data-parallel coordinates.

The cursor is global: the number of stream positions consumed by completed optimizer
steps. A step is complete once this rank has handed out its `micro_batches_per_step`-th
micro-batch of it; `state_dict()` taken in the middle of a step points at the start of
that step, so resuming replays the whole step, which is right for a checkpoint whose
optimizer has not applied it. Resuming with another dp_size (or global batch) continues
at the same stream position: no sample is lost or repeated.
"""

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from data_pipeline.blocks import BlockCache
from data_pipeline.manifest import load_manifest
from data_pipeline.order import SampleOrder
from pretrain.errors import UserError

BAD_SHARD_MODES = ("error", "skip")
# Settings that define the order; a cursor saved under other values would point elsewhere.
ORDER_KEYS = ("fingerprint", "split", "seed", "seq_len", "n_future", "block_shards")


class StreamingLoader:
    """Endless micro-batches of one split for one data-parallel rank, with a global cursor."""

    def __init__(self, data_dir: str, split: str, seq_len: int, n_future: int,
                 micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 num_workers: int = 1, on_bad_shard: str = "error", block_shards: int = 4):
        _check_args(seq_len, n_future, micro_batch_size, global_batch_size, dp_rank, dp_size,
                    seed, num_workers, on_bad_shard, block_shards)
        self.data_dir = data_dir
        self.split = split
        self.seq_len = seq_len
        self.n_future = n_future
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_workers = num_workers
        self.on_bad_shard = on_bad_shard
        self.block_shards = block_shards
        self.manifest = load_manifest(data_dir)
        self.shards = self.manifest.split_shards(split)
        if not self.shards:
            raise UserError(f"{data_dir} has no {split!r} shards; use split train or val, or re-run mtp prepare")
        self.order = SampleOrder([s.tokens for s in self.shards], seq_len, n_future, seed, block_shards)
        if self.order.windows_per_epoch == 0:
            raise UserError(f"the {split} split of {data_dir} is too small for one window of "
                            f"seq_len + n_future = {seq_len + n_future} tokens; lower seq_len or prepare more data")
        self.consumed = 0  # stream positions used by completed optimizer steps
        self.skipped_shards: set[str] = set()  # names of the bad shards skipped so far

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def windows_per_epoch(self) -> int:
        return self.order.windows_per_epoch

    @property
    def epoch(self) -> int:
        return self.consumed // self.windows_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from the cursor on; use one iterator at a time."""
        start = self.consumed
        batches = self._micro_batches(start)
        if self.num_workers:
            batches = _prefetch(batches, depth=min(32, 2 * self.micro_batches_per_step))
        try:
            for index, batch in enumerate(batches):
                if (index + 1) % self.micro_batches_per_step == 0:
                    # counted before the yield: once the trainer holds the step's last micro-batch
                    self.consumed = start + (index + 1) // self.micro_batches_per_step * self.global_batch_size
                yield batch
        finally:
            batches.close()

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in ORDER_KEYS if key != "fingerprint"}
        return {
            **state,
            "fingerprint": self.manifest.fingerprint,
            "consumed_samples": self.consumed,
            "epoch": self.epoch,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ORDER_KEYS:
            if state.get(key) != mine[key]:
                raise UserError(
                    f"the data cursor was saved with {key}={state.get(key)!r} but this run has {key}={mine[key]!r}; "
                    "the sample order would differ, so restore the saved setting or start a new run"
                )
        self.consumed = int(state["consumed_samples"])

    def _micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of every step from stream position `start` on."""
        cache = BlockCache(self.order, self.data_dir, self.shards, self.manifest.dtype,
                           self.num_workers, self.on_bad_shard, self.skipped_shards)
        per_rank = self.global_batch_size // self.dp_size
        try:
            for step_start in range(start, 2**62, self.global_batch_size):
                base = step_start + self.dp_rank * per_rank
                for first in range(base, base + per_rank, self.micro_batch_size):
                    yield self._batch(cache, np.arange(first, first + self.micro_batch_size, dtype=np.int64))
        finally:
            cache.close()

    def _batch(self, cache: BlockCache, positions: np.ndarray) -> dict[str, torch.Tensor]:
        inputs = np.empty((len(positions), self.seq_len), dtype=np.int64)  # [mb, seq_len]
        labels = np.empty((len(positions), self.n_future, self.seq_len), dtype=np.int64)  # [mb, n_future, seq_len]
        ids, row = [], 0
        for group in self._by_block(positions):
            block = cache.get(*self.order.locate(int(group[0])))
            ids.append(block.fill(group, self.seq_len, inputs[row : row + len(group)], labels[row : row + len(group)]))
            row += len(group)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),  # labels[:, k-1] = input_ids shifted left by k
            "sample_ids": torch.from_numpy(np.concatenate(ids)),  # [mb]
        }

    def _by_block(self, positions: np.ndarray) -> list[np.ndarray]:
        """Split consecutive positions where a block (or epoch) ends."""
        groups, rest = [], positions
        while len(rest):
            epoch, block = self.order.locate(int(rest[0]))
            end = self.order.block_end(epoch, block)
            groups.append(rest[rest < end])
            rest = rest[rest >= end]
        return groups


def _check_args(seq_len, n_future, micro_batch_size, global_batch_size, dp_rank, dp_size,
                seed, num_workers, on_bad_shard, block_shards) -> None:
    checks = [
        (seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"),
        (n_future >= 1, f"n_future must be >= 1, got {n_future}"),
        (micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {micro_batch_size}"),
        (dp_size >= 1 and 0 <= dp_rank < dp_size, f"dp_rank must be in [0, dp_size), got {dp_rank} of {dp_size}"),
        (global_batch_size >= 1 and global_batch_size % (micro_batch_size * dp_size) == 0,
         f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size x dp_size "
         f"= {micro_batch_size} x {dp_size}"),
        (seed >= 0, f"seed must be >= 0, got {seed}"),
        (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
        (on_bad_shard in BAD_SHARD_MODES, f"on_bad_shard must be one of {', '.join(BAD_SHARD_MODES)}, got {on_bad_shard!r}"),
        (block_shards >= 1, f"block_shards must be >= 1, got {block_shards}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _prefetch(items: Iterable, depth: int) -> Iterator:
    """Run `items` in a daemon thread, `depth` results ahead; exceptions re-raised here."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> None:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def fill() -> None:
        try:
            for item in items:
                put((True, item))
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put((False, err))
        finally:
            items.close()

    threading.Thread(target=fill, name="batch-prefetch", daemon=True).start()
    try:
        while True:
            ok, value = slots.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()

"""Loading the shards of the current and next block in background threads.

Shard reads (file or pipe I/O, sha256, tar parsing) release the GIL, so threads
overlap them with training. Blocks are requested in stream order and results
are consumed in that order, so the thread count never changes the data.
"""

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from data_pipeline.manifest import ShardInfo
from data_pipeline.order import BlockPlan, SampleOrder
from data_pipeline.shards import ShardError, read_shard
from pretrain.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoadedBlock:
    plan: BlockPlan
    tokens: np.ndarray  # [block tokens] the good shards of the block, concatenated
    offsets: np.ndarray  # [k] where each shard slot starts in `tokens` (unused for bad slots)
    ids: np.ndarray  # [k] split-wide id of each slot's window 0

    def fill(self, positions: np.ndarray, seq_len: int, inputs: np.ndarray, labels: np.ndarray,
             rows: np.ndarray) -> np.ndarray:
        """Write the windows at stream `positions` [m] into rows `rows` [m] of `inputs` [mb, seq_len] and
        `labels` [mb, n_future, seq_len] (head k's row is the input shifted by k); return window ids [m].

        Slice-by-slice copies that also widen the dtype: far faster than building one
        [m, seq_len + n_future] tensor and materialising strided views of it.
        """
        slot, index = self.plan.lookup(positions)
        starts = self.offsets[slot] + index * seq_len  # [m]
        for row, start in zip(rows.tolist(), starts.tolist()):
            inputs[row] = self.tokens[start : start + seq_len]
            for k in range(labels.shape[1]):
                labels[row, k] = self.tokens[start + k + 1 : start + k + 1 + seq_len]
        return self.ids[slot] + index


class BlockCache:
    """Gives the loaded block for (epoch, block) and starts reading the following one."""

    def __init__(self, order: SampleOrder, location: str, shards: list[ShardInfo], dtype: str,
                 num_workers: int, on_bad_shard: str, skipped: set[str]):
        self.order = order
        self.location = location
        self.shards = shards
        self.dtype = dtype
        self.on_bad_shard = on_bad_shard
        self.skipped = skipped  # bad shard names, shared with the loader: each warned about once
        self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix="shard-reader") if num_workers else None
        self.pending: dict[tuple[int, int], list[Future | np.ndarray | ShardError]] = {}
        self.loaded: dict[tuple[int, int], LoadedBlock] = {}

    def get(self, epoch: int, block: int) -> LoadedBlock:
        key = (epoch, block)
        if key not in self.loaded:
            self._request(key)
            if self.pool is not None:  # read ahead only when reads happen in the background
                self._request(self.order.next_block(epoch, block))
            self.loaded = {key: self._assemble(key)}
            self.pending = {k: v for k, v in self.pending.items() if k > key}
        return self.loaded[key]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, key: tuple[int, int]) -> None:
        if key in self.pending or key in self.loaded:
            return
        plan_shards = self.order.epoch_blocks(key[0])[0][key[1]]
        self.pending[key] = [self._submit(self.shards[i]) for i in plan_shards]

    def _submit(self, shard: ShardInfo):
        if self.pool is None:
            return _read(self.location, shard, self.dtype)
        return self.pool.submit(_read, self.location, shard, self.dtype)

    def _assemble(self, key: tuple[int, int]) -> LoadedBlock:
        plan = self.order.plan(*key)
        results = [r.result() if isinstance(r, Future) else r for r in self.pending.pop(key)]
        bad = [slot for slot, r in enumerate(results) if isinstance(r, ShardError)]
        for slot in bad:
            self._bad_shard(self.shards[plan.shards[slot]].name, results[slot])
        if bad:
            plan = plan.without(np.array(bad))
            if plan.size == 0:
                raise UserError(f"every shard of a block is unreadable ({results[bad[0]]}); run `mtp data verify {self.location}`")
        arrays = [np.zeros(0, self.dtype) if slot in bad else r for slot, r in enumerate(results)]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # [k]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)
        return LoadedBlock(plan, tokens, offsets, self.order.first_id[plan.shards])

    def _bad_shard(self, name: str, err: ShardError) -> None:
        if self.on_bad_shard == "error":
            raise UserError(
                f"{err}; run `mtp data verify {self.location}` to list every bad shard, "
                "or set data.on_bad_shard=skip to train without it"
            )
        if name not in self.skipped:  # every epoch meets it again; once is enough to say so
            log.warning("skipping bad shard: %s", err)
            self.skipped.add(name)


def _read(location: str, shard: ShardInfo, dtype: str) -> np.ndarray | ShardError:
    """A shard's tokens, or the ShardError saying why not (returned, so one bad shard
    does not cancel the reads of its neighbours)."""
    try:
        return read_shard(location, shard, dtype)
    except ShardError as err:
        return err

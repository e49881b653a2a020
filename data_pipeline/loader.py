"""StreamingLoader: deterministic, resumable micro-batches for one data-parallel rank.

Global batch s is stream positions [s*G, (s+1)*G) after the resume point (see
`order.py` for the stream), whatever the number of ranks. Data-parallel rank r of
R takes the contiguous slice [r*G/R, (r+1)*G/R) of it and cuts it into micro-batches,
so tensor/pipeline peers (same dp_rank) receive identical batches. Nothing here reads
RANK or WORLD_SIZE: the caller passes the data-parallel coordinates.

With several sources (a weighted mixture), each stream position first picks its
source and its position in that source's own stream (`mixture.py`), then that
source's order picks the window; with one source the stream is the source's own.

The cursor is global: the number of stream positions consumed by completed optimizer
steps. A step is complete once this rank has handed out its `micro_batches_per_step`-th
micro-batch of it; `state_dict()` taken in the middle of a step points at the start of
that step, so resuming replays the whole step, which is right for a checkpoint whose
optimizer has not applied it. Resuming with another dp_size (or global batch) continues
at the same position: no sample is lost or repeated, in any source.
"""

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.blocks import BlockCache
from data_pipeline.manifest import load_manifest
from data_pipeline.mixture import Mixture
from data_pipeline.order import SampleOrder
from pretrain.errors import UserError

BAD_SHARD_MODES = ("error", "skip")
# Settings that define the order; a cursor saved under other values would point elsewhere.
ORDER_KEYS = ("fingerprint", "split", "seed", "seq_len", "n_future", "block_shards")
SOURCE_ID_SHIFT = 48  # sample_ids of a mixture: source index << 48 | window id in that source


@dataclass(frozen=True)
class Source:
    """One prepared data set of a mixture."""

    location: str
    weight: float = 1.0
    name: str = ""


class SourceReader:
    """One source's split: its manifest (shared per process), sample order and the window copy."""

    def __init__(self, source: Source, split: str, seq_len: int, n_future: int, seed: int, block_shards: int):
        self.source = source
        self.manifest = load_manifest(source.location)
        self.shards = self.manifest.split_shards(split)
        where = source.location if not source.name else f"source {source.name} ({source.location})"
        if not self.shards:
            raise UserError(f"{where} has no {split!r} shards; use split train or val, or re-run mtp prepare")
        self.order = SampleOrder([s.tokens for s in self.shards], seq_len, n_future, seed, block_shards)
        if self.order.windows_per_epoch == 0:
            raise UserError(f"the {split} split of {where} is too small for one window of "
                            f"seq_len + n_future = {seq_len + n_future} tokens; lower seq_len or prepare more data")

    def cache(self, num_workers: int, on_bad_shard: str, skipped: set[str]) -> BlockCache:
        return BlockCache(self.order, self.source.location, self.shards, self.manifest.dtype,
                          num_workers, on_bad_shard, skipped)

    def fill(self, cache: BlockCache, local: np.ndarray, rows: np.ndarray, inputs: np.ndarray,
             labels: np.ndarray) -> np.ndarray:
        """Windows at this source's ascending stream positions `local` [m] into `rows` [m]; window ids [m]."""
        ids = np.empty(len(local), dtype=np.int64)
        i = 0
        while i < len(local):  # one run per block (or epoch) the positions cross
            epoch, block = self.order.locate(int(local[i]))
            j = i + int(np.searchsorted(local[i:], self.order.block_end(epoch, block)))
            ids[i:j] = cache.get(epoch, block).fill(local[i:j], self.order.seq_len, inputs, labels, rows[i:j])
            i = j
        return ids


class StreamingLoader:
    """Endless micro-batches of one split for one data-parallel rank, with a global cursor.

    `data` is one data set location, or a list of `Source`s mixed by weight.
    """

    def __init__(self, data: "str | list[Source]", split: str, seq_len: int, n_future: int,
                 micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 num_workers: int = 1, on_bad_shard: str = "error", block_shards: int = 4):
        _check_args(seq_len, n_future, micro_batch_size, global_batch_size, dp_rank, dp_size,
                    seed, num_workers, on_bad_shard, block_shards)
        self.sources = [Source(data)] if isinstance(data, str) else list(data)
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
        self.readers = [SourceReader(s, split, seq_len, n_future, seed, block_shards) for s in self.sources]
        self.mixture = Mixture([s.weight for s in self.sources], seed) if len(self.sources) > 1 else None
        self.manifest = self.readers[0].manifest
        self.consumed = 0  # stream positions used by completed optimizer steps
        self.skipped_shards: set[str] = set()  # names of the bad shards skipped so far

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def windows_per_epoch(self) -> int:
        """Windows of one epoch of every source, together."""
        return sum(r.order.windows_per_epoch for r in self.readers)

    @property
    def epoch(self) -> int:
        """The epoch the first (or only) source is in."""
        return self.source_epochs()[0]

    def source_samples(self) -> list[int]:
        """Windows each source has delivered in completed steps."""
        if self.mixture is None:
            return [self.consumed]
        return self.mixture.consumed(self.consumed).tolist()

    def source_epochs(self) -> list[int]:
        return [n // r.order.windows_per_epoch for n, r in zip(self.source_samples(), self.readers)]

    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens each source has delivered in completed steps (all data-parallel ranks)."""
        return {s.name: n * self.seq_len for s, n in zip(self.sources, self.source_samples())}

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
        common = {key: getattr(self, key) for key in ORDER_KEYS if key != "fingerprint"}
        common.update(consumed_samples=self.consumed, global_batch_size=self.global_batch_size)
        if self.mixture is None:  # the single-source form, as every checkpoint before mixtures has it
            return {**common, "fingerprint": self.manifest.fingerprint, "epoch": self.epoch}
        sources = [{"name": s.name, "weight": s.weight, "fingerprint": r.manifest.fingerprint,
                    "samples": n, "epoch": e}
                   for s, r, n, e in zip(self.sources, self.readers, self.source_samples(), self.source_epochs())]
        return {**common, "sources": sources}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if ("sources" in state) != ("sources" in mine):
            saved = f"a mixture of {len(state['sources'])} sources" if "sources" in state else "one data set"
            here = f"a mixture of {len(mine['sources'])} sources" if "sources" in mine else "one data set"
            raise UserError(f"the data cursor was saved for {saved} but this run reads {here}; "
                            "restore the saved data settings or start a new run")
        for key in ORDER_KEYS:
            if key in mine and state.get(key) != mine[key]:
                raise UserError(
                    f"the data cursor was saved with {key}={state.get(key)!r} but this run has {key}={mine[key]!r}; "
                    "the sample order would differ, so restore the saved setting or start a new run"
                )
        if "sources" in mine:
            _check_same_mixture(state["sources"], mine["sources"])
        self.consumed = int(state["consumed_samples"])

    def _micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of every step from stream position `start` on."""
        caches = [r.cache(self.num_workers, self.on_bad_shard, self.skipped_shards) for r in self.readers]
        per_rank = self.global_batch_size // self.dp_size
        try:
            for step_start in range(start, 2**62, self.global_batch_size):
                base = step_start + self.dp_rank * per_rank
                for first in range(base, base + per_rank, self.micro_batch_size):
                    yield self._batch(caches, np.arange(first, first + self.micro_batch_size, dtype=np.int64))
        finally:
            for cache in caches:
                cache.close()

    def _batch(self, caches: list[BlockCache], positions: np.ndarray) -> dict[str, torch.Tensor]:
        inputs = np.empty((len(positions), self.seq_len), dtype=np.int64)  # [mb, seq_len]
        labels = np.empty((len(positions), self.n_future, self.seq_len), dtype=np.int64)  # [mb, n_future, seq_len]
        rows = np.arange(len(positions))
        if self.mixture is None:
            ids = self.readers[0].fill(caches[0], positions, rows, inputs, labels)
        else:
            sources, local = self.mixture.locate(positions)  # [mb], [mb]
            ids = np.empty(len(positions), dtype=np.int64)
            for s in np.unique(sources).tolist():
                mine = rows[sources == s]
                ids[mine] = self.readers[s].fill(caches[s], local[mine], mine, inputs, labels) + (s << SOURCE_ID_SHIFT)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),  # labels[:, k-1] = input_ids shifted left by k
            "sample_ids": torch.from_numpy(ids),  # [mb]
        }


def split_sample_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A mixture's sample_ids -> (source index [m], window id in that source [m])."""
    return ids >> SOURCE_ID_SHIFT, ids & ((1 << SOURCE_ID_SHIFT) - 1)


def _check_same_mixture(saved: list[dict], mine: list[dict]) -> None:
    def shown(sources):
        return ", ".join(f"{s['name']} (weight {s['weight']}, data {s['fingerprint'][:12]})" for s in sources)

    keys = ("name", "weight", "fingerprint")
    if [[s.get(k) for k in keys] for s in saved] != [[s[k] for k in keys] for s in mine]:
        raise UserError(f"the data cursor was saved for the mixture {shown(saved)} but this run mixes {shown(mine)}; "
                        "a position would draw from other sources, so restore data.sources or start a new run")


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
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, raised there
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

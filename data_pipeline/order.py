"""The sample order: a pure function of (seed, epoch, position), computed from manifest counts.

Windows. A shard's samples, concatenated, form one token run of T tokens. Window j
of a shard covers tokens [j*seq_len, j*seq_len + seq_len + n_future): stride
seq_len, so every token is an input exactly once and consecutive windows overlap
only by the n_future label tokens. A shard has (T - n_future) // seq_len windows;
the few tokens after its last window are not used. A window's id is its index in
the split (shards in manifest order), stable across epochs.

Epoch e. The shards are permuted with key (seed, e) and cut into blocks of
`block_shards` consecutive shards; all windows of a block are then permuted with
key (seed, e, block). The epoch is the blocks' permuted windows, one block after
another, so a reader holds about one block in memory and reads each shard whole,
and a block of mixed shards gives well-mixed batches. When the whole split fits
in one block the order is a full random permutation.

Stream. Epochs follow one another without a gap: position q of the endless stream
is position q % N of epoch q // N (N = windows per epoch), so nothing is dropped
at epoch ends and a global batch may straddle two epochs.
"""

from dataclasses import dataclass

import numpy as np

from data_pipeline.rng import permutation


def windows_in(tokens: int, seq_len: int, n_future: int) -> int:
    """Windows of seq_len + n_future tokens, stride seq_len, that fit in a run of `tokens`."""
    return max(0, (tokens - n_future) // seq_len)


@dataclass
class BlockPlan:
    """Which window each position of one block maps to."""

    epoch: int
    index: int
    start: int  # stream position of the block's first window
    shards: np.ndarray  # [k] shard indices (into the split's shard list), block order
    cum: np.ndarray  # [k + 1] cumulative window counts of those shards
    perm: np.ndarray  # [windows] local position -> enumerated window (shard-major)

    @property
    def size(self) -> int:
        return len(self.perm)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions inside this block -> (shard slot in block [m], window in shard [m])."""
        enumerated = self.perm[positions - self.start]  # [m]
        slot = np.searchsorted(self.cum, enumerated, side="right") - 1  # [m]
        return slot, enumerated - self.cum[slot]

    def without(self, bad_slots: np.ndarray) -> "BlockPlan":
        """The same plan with every window of the `bad_slots` shards replaced by a good one.

        Position i that maps into a bad shard takes the (i mod G)-th good window of the
        block's own order (G good windows), so batch shapes and stream positions stay
        as they were and every rank, seeing the same bad shards, makes the same choice.
        """
        slot_of = np.repeat(np.arange(len(self.shards)), np.diff(self.cum))  # [windows]
        bad = np.isin(slot_of[self.perm], bad_slots)  # [windows] by position
        good = self.perm[~bad]
        if len(good) == 0:
            return BlockPlan(self.epoch, self.index, self.start, self.shards, self.cum, good)
        perm = self.perm.copy()
        bad_positions = np.nonzero(bad)[0]
        perm[bad_positions] = good[bad_positions % len(good)]
        return BlockPlan(self.epoch, self.index, self.start, self.shards, self.cum, perm)


class SampleOrder:
    """Stream position -> (block, window) for one split; holds only per-shard counts."""

    def __init__(self, shard_tokens: list[int], seq_len: int, n_future: int, seed: int, block_shards: int):
        self.seq_len = seq_len
        self.n_future = n_future
        self.seed = seed
        self.block_shards = block_shards
        self.counts = np.array([windows_in(t, seq_len, n_future) for t in shard_tokens], dtype=np.int64)  # [S]
        self.first_id = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)  # [S]
        self.windows_per_epoch = int(self.counts.sum())
        self._epoch: tuple[int, list[np.ndarray], np.ndarray] | None = None

    def epoch_blocks(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's blocks (shard indices each) and their start offsets in the epoch [B + 1]."""
        if self._epoch is None or self._epoch[0] != epoch:
            shards = permutation(len(self.counts), self.seed, epoch, 0)  # [S]
            blocks = [shards[i : i + self.block_shards] for i in range(0, len(shards), self.block_shards)]
            starts = np.concatenate([[0], np.cumsum([self.counts[b].sum() for b in blocks])]).astype(np.int64)
            self._epoch = (epoch, blocks, starts)
        return self._epoch[1], self._epoch[2]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, block index) holding stream position `position`."""
        epoch, offset = divmod(position, self.windows_per_epoch)
        _, starts = self.epoch_blocks(epoch)
        return epoch, int(np.searchsorted(starts, offset, side="right")) - 1

    def block_end(self, epoch: int, block: int) -> int:
        """Stream position just after the last window of (epoch, block)."""
        _, starts = self.epoch_blocks(epoch)
        return epoch * self.windows_per_epoch + int(starts[block + 1])

    def next_block(self, epoch: int, block: int) -> tuple[int, int]:
        """The block that follows (epoch, block) in the stream, skipping blocks without windows."""
        return self.locate(self.block_end(epoch, block))

    def plan(self, epoch: int, block: int) -> BlockPlan:
        blocks, starts = self.epoch_blocks(epoch)
        shards = blocks[block]
        cum = np.concatenate([[0], np.cumsum(self.counts[shards])]).astype(np.int64)  # [k + 1]
        perm = permutation(int(cum[-1]), self.seed, epoch, 1, block)  # [windows]
        start = epoch * self.windows_per_epoch + int(starts[block])
        return BlockPlan(epoch, block, start, shards, cum, perm)

"""Which source each position of a weighted mixture draws from: a pure function of (seed, position).

The mixture stream is cut into blocks of `BLOCK` positions. Source s has
`C_s(b) = floor(p_s * BLOCK * b)` positions before block b (p_s its normalised
weight; exact rational arithmetic on the weights, so every machine agrees), except
the heaviest source, which takes the rest, so the counts always sum to
`BLOCK * b`. Block b therefore holds `n_s = C_s(b+1) - C_s(b)` positions of each
source, spread over the block by a seeded permutation keyed by (seed, b). So:

- the proportions are exact to within one position per source at every block
  boundary, and random inside a block, like a shuffled blend;
- a position's source and its index in that source's own stream (the source's
  "local position": how many earlier positions drew from it) are computed from
  the block alone, without walking the stream, so a resume at any position,
  with any data-parallel size, continues every source exactly where it was;
- each source's local positions are 0, 1, 2, ... without a gap, so every source
  delivers its own stream (its epochs, its order) exactly once.

Megatron's blended datasets and MosaicML streaming also mix by weight; this is
our own form because the order must be a function of the position alone.
"""

from fractions import Fraction

import numpy as np

from data_pipeline.rng import permutation
from pretrain.errors import UserError

BLOCK = 4096
MAX_SOURCES = 64  # the heaviest source's share of a block must cover the others' rounding: BLOCK >= S * (S - 1)
MIX_KEY = 0x6D6978  # "mix": keeps these permutations apart from the sample order's


def check_weights(weights: list[float], where: str = "data.sources") -> None:
    if not weights:
        raise UserError(f"{where} is empty; give at least one {{dir: ..., weight: ...}}")
    if len(weights) > MAX_SOURCES:
        raise UserError(f"{where} has {len(weights)} sources; at most {MAX_SOURCES} are supported")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and np.isfinite(w) and w > 0):
            raise UserError(f"{where}[{i}].weight must be a positive number, got {w!r}")


class Mixture:
    """Stream position -> (source, local position) for fixed weights and seed."""

    def __init__(self, weights: list[float], seed: int):
        check_weights(weights)
        self.seed = seed
        fractions = [Fraction(w) for w in weights]
        total = sum(fractions)
        self.shares = [f / total for f in fractions]  # exact p_s
        self.heaviest = max(range(len(weights)), key=lambda s: (self.shares[s], -s))
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def size(self) -> int:
        return len(self.shares)

    def before_block(self, block: int) -> np.ndarray:
        """Positions of each source before block `block`: [S] int64."""
        counts = [(p.numerator * BLOCK * block) // p.denominator for p in self.shares]
        counts[self.heaviest] = BLOCK * block - (sum(counts) - counts[self.heaviest])
        return np.array(counts, dtype=np.int64)

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [BLOCK], local position [BLOCK]) of every position of block `block`."""
        cached = self._block  # one read: the batch thread and the metrics read it concurrently
        if cached is None or cached[0] != block:
            start, end = self.before_block(block), self.before_block(block + 1)
            labels = np.repeat(np.arange(self.size), end - start)  # [BLOCK] sorted by source
            source = labels[permutation(BLOCK, self.seed, MIX_KEY, block)]  # [BLOCK]
            order = np.argsort(source, kind="stable")  # the positions of each source, in stream order
            rank = np.empty(BLOCK, dtype=np.int64)
            rank[order] = np.arange(BLOCK) - np.repeat(np.cumsum(end - start) - (end - start), end - start)
            cached = self._block = (block, source, start[source] + rank)
        return cached[1], cached[2]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source [m], local position [m]) of stream `positions` [m]."""
        sources = np.empty(len(positions), dtype=np.int64)
        local = np.empty(len(positions), dtype=np.int64)
        blocks = positions // BLOCK
        for block in np.unique(blocks):
            rows = np.nonzero(blocks == block)[0]
            src, loc = self.block(int(block))
            offsets = positions[rows] - block * BLOCK
            sources[rows], local[rows] = src[offsets], loc[offsets]
        return sources, local

    def consumed(self, position: int) -> np.ndarray:
        """Positions each source has delivered before stream position `position`: [S] int64."""
        block, offset = divmod(position, BLOCK)
        counts = self.before_block(block)
        if offset:
            source, _ = self.block(block)
            counts = counts + np.bincount(source[:offset], minlength=self.size)
        return counts

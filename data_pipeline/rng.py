"""Seeded permutations that stay the same across machines and numpy versions.

Data order must be reproducible years later and on another cluster (a resumed
run re-derives it). numpy guarantees the raw stream of its bit generators and of
`SeedSequence`, but not the algorithms behind `Generator.permutation`, so the
permutation is the stable argsort of raw 64-bit draws.
"""

import numpy as np


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) that is a pure function of `key` (non-negative ints): [n] int64."""
    bits = np.random.PCG64(np.random.SeedSequence(list(key))).random_raw(n)  # [n] uint64
    return np.argsort(bits, kind="stable")

"""Which split and which part a document belongs to: a stable hash of its identity.

No global shuffle and no list of documents: each document is decided on its own,
from (seed, identity) alone, so the decision is the same in every process, on
every node, for `mtp prepare` in one go and for any `--part I/N`, and memory does
not grow with the corpus. BLAKE2b (hashlib) is the hash: fast, and fixed by its
specification, so a data set re-prepared years later splits the same way.
"""

import hashlib
from dataclasses import dataclass

from pretrain.errors import UserError

SPACE = 1 << 64


@dataclass(frozen=True)
class PartSpec:
    index: int  # 0-based
    count: int

    @property
    def tag(self) -> str:
        """The part's mark in file names: "00001of00003"."""
        return f"{self.index:05d}of{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = PartSpec(0, 1)


def parse_part(text: str) -> PartSpec:
    """`--part I/N` -> PartSpec; parts are numbered 0..N-1 like SLURM array task ids."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit() or int(count) < 1:
        raise UserError(f"--part {text}: write it as I/N with 0 <= I < N, e.g. --part 0/8 (parts are numbered from 0)")
    spec = PartSpec(int(index), int(count))
    if spec.index >= spec.count:
        raise UserError(f"--part {text}: parts of {spec.count} are numbered 0..{spec.count - 1}")
    return spec


class Assigner:
    """identity -> "train" | "val" | None (another part's document)."""

    def __init__(self, seed: int, val_fraction: float, part: PartSpec = WHOLE):
        self.seed = seed
        self.val_threshold = int(val_fraction * SPACE)
        self.part = part

    def split_of(self, identity: str) -> str | None:
        digest = hashlib.blake2b(f"{self.seed}\0{identity}".encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if int.from_bytes(digest[:8], "little") % self.part.count != self.part.index:
            return None
        return "val" if int.from_bytes(digest[8:], "little") < self.val_threshold else "train"

    def sampled(self, identity: str, rate: float) -> bool:
        """A stable `rate` share of documents (BPE training reads those), independent of the split."""
        digest = hashlib.blake2b(f"sample\0{self.seed}\0{identity}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < rate * SPACE

"""`manifest.json`: the table of contents of a prepared data set.

The loader never lists directories or opens a shard to learn its size: every
count it needs to compute the sample order (tokens per sample, per shard, per
split) is here, so the order of an epoch is known before any shard is read, and
`mtp data verify` can check each shard's bytes against a sha256.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field

from data_pipeline import locations
from pretrain.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = "mtp-token-shards"
VERSION = 1
SAMPLE_KEY = "tokens.npy"  # the one member of every webdataset sample
SPLITS = ("train", "val")


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int
    sample_tokens: list[int]  # tokens in each sample, in tar order
    documents: int  # documents that end in this shard (eod tokens it holds)
    sha256: str
    bytes: int

    @property
    def tokens(self) -> int:
        return sum(self.sample_tokens)


@dataclass
class Manifest:
    tokenizer: dict  # Tokenizer.describe() plus the sha256 of its files
    dtype: str  # numpy dtype string of the stored ids, e.g. "<u2"
    shards: list[ShardInfo]
    source: dict  # what was read: description, documents, bytes
    seed: int
    val_fraction: float
    shard_tokens: int
    sample_tokens: int
    fingerprint: str = ""
    format: str = FORMAT
    version: int = VERSION
    sample_key: str = SAMPLE_KEY
    splits: dict = field(default_factory=dict)  # split -> {"shards", "tokens", "documents"}

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def finalize(self) -> None:
        """Fill the per-split totals and the fingerprint from the shard list."""
        self.splits = {split: split_totals(self.split_shards(split)) for split in SPLITS}
        self.fingerprint = compute_fingerprint(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def split_totals(shards: list[ShardInfo]) -> dict:
    return {
        "shards": len(shards),
        "tokens": sum(s.tokens for s in shards),
        "documents": sum(s.documents for s in shards),
    }


def compute_fingerprint(manifest: Manifest) -> str:
    """One hash naming the exact token content: shards, their order, tokenizer and dtype.

    Cursors saved in checkpoints carry it, so resuming against different data is caught.
    """
    content = {
        "dtype": manifest.dtype,
        "tokenizer": manifest.tokenizer,
        "shards": [[s.name, s.split, s.sha256] for s in manifest.shards],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def load_manifest(location: str) -> Manifest:
    """Read and sanity-check `manifest.json`; UserError if absent or malformed."""
    raw = locations.read_optional(location, MANIFEST_FILE)
    where = locations.resolve(location, MANIFEST_FILE)
    if raw is None:
        raise UserError(f"no {where}; prepare the data first: mtp prepare --out {location}")
    try:
        obj = json.loads(raw)
        shards = [ShardInfo(**s) for s in obj.pop("shards")]
        manifest = Manifest(shards=shards, **obj)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{where} is malformed ({err}); re-run mtp prepare --overwrite") from None
    if manifest.format != FORMAT or manifest.version != VERSION:
        raise UserError(f"{where} has format {manifest.format} v{manifest.version}; this program reads {FORMAT} v{VERSION}")
    return manifest

"""`manifest.json`: the table of contents of a prepared data set.

The loader never lists directories or opens a shard to learn its size: every
count it needs to compute the sample order (tokens per sample, per shard, per
split) is here, so the order of an epoch is known before any shard is read, and
`mtp data verify` can check each shard's bytes against a sha256.

Version 2 stores the shard table by column (one list per field) and no per-sample
list: every sample of a shard holds `sample_tokens` tokens but the last, which
holds the rest. That keeps a 100k-shard manifest a few MB that `json` parses in
a fraction of a second. Version 1 manifests (a list of objects with a per-sample
list) still load, into the same structure and the same fingerprint, so cursors in
checkpoints made on them stay valid. A process loads each manifest once: the
training loader, every validation loader and the config check share it.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from data_pipeline import locations
from pretrain.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = "mtp-token-shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SAMPLE_KEY = "tokens.npy"  # the one member of every webdataset sample
SPLITS = ("train", "val")
COLUMNS = ("name", "split", "samples", "tokens", "documents", "sha256", "bytes")


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int
    tokens: int
    documents: int  # documents that end in this shard (eod tokens it holds)
    sha256: str
    bytes: int
    sample_size: int  # tokens of every sample but the last

    @property
    def sample_tokens(self) -> list[int]:
        """Tokens in each sample, in tar order."""
        if self.samples == 0:
            return []
        return [self.sample_size] * (self.samples - 1) + [self.tokens - self.sample_size * (self.samples - 1)]


@dataclass
class Manifest:
    tokenizer: dict  # Tokenizer.describe() plus the sha256 of its files
    dtype: str  # numpy dtype string of the stored ids, e.g. "<u2"
    shards: list[ShardInfo]
    source: dict  # what was read: description, files, documents, bytes
    seed: int
    val_fraction: float
    shard_tokens: int
    sample_tokens: int  # tokens per sample (every sample of a shard but its last)
    parts: int = 1  # how many `mtp prepare --part I/N` runs built it
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
        body = {k: v for k, v in asdict(self).items() if k != "shards"}
        body["shards"] = {column: [getattr(s, column) for s in self.shards] for column in COLUMNS}
        return json.dumps(body, separators=(",", ":")) + "\n"


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


def write_manifest(directory: str, manifest: Manifest, name: str = MANIFEST_FILE) -> None:
    """Write atomically: temp file, fsync, rename."""
    path = os.path.join(directory, name)
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


_cache: dict[str, tuple[tuple, Manifest]] = {}


def load_manifest(location: str, name: str = MANIFEST_FILE) -> Manifest:
    """Read and sanity-check a manifest; UserError if absent or malformed.

    Cached per process: a local file is read again only when its size, mtime or
    inode changed (a data set re-prepared in place); a URL is read once.
    """
    where = locations.resolve(location, name)
    stamp = _stamp(location, where)
    cached = _cache.get(where)
    if cached is not None and stamp is not None and cached[0] == stamp:
        return cached[1]
    manifest = parse_manifest(locations.read_optional(location, name), where, location)
    if stamp is not None:
        _cache[where] = (stamp, manifest)
    return manifest


def _stamp(location: str, where: str) -> tuple | None:
    if locations.is_url(location):
        return ("url",)
    try:
        st = os.stat(where)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def parse_manifest(raw: bytes | None, where: str, location: str) -> Manifest:
    if raw is None:
        raise UserError(f"no {where}; prepare the data first: mtp prepare --out {location}")
    try:
        obj = json.loads(raw)
        version = obj.get("version")
        if obj.get("format") != FORMAT or version not in READABLE_VERSIONS:
            raise UserError(f"{where} has format {obj.get('format')} v{version}; this program reads "
                            f"{FORMAT} v{', v'.join(map(str, READABLE_VERSIONS))}")
        shards = _v1_shards(obj) if version == 1 else _v2_shards(obj)
        obj["version"] = VERSION
        return Manifest(shards=shards, **obj)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{where} is malformed ({err}); re-run mtp prepare --overwrite") from None


def _v2_shards(obj: dict) -> list[ShardInfo]:
    table = obj.pop("shards")
    size = obj["sample_tokens"]
    columns = [table[c] for c in COLUMNS]
    if len({len(c) for c in columns}) > 1:
        raise ValueError("shard columns differ in length")
    return [ShardInfo(*row, sample_size=size) for row in zip(*columns)]


def _v1_shards(obj: dict) -> list[ShardInfo]:
    """Version 1: a list of shard objects, each with the list of its sample lengths."""
    shards = []
    for s in obj.pop("shards"):
        lengths = s["sample_tokens"]
        size = lengths[0] if len(lengths) > 1 else min(obj["sample_tokens"], obj["shard_tokens"])
        shard = ShardInfo(s["name"], s["split"], s["samples"], sum(lengths), s["documents"], s["sha256"], s["bytes"], size)
        if shard.sample_tokens != lengths:
            raise ValueError(f"shard {shard.name}: sample lengths {lengths[:3]}... do not follow full samples and a last one")
        shards.append(shard)
    return shards

"""Facts about a prepared data set that a trainer needs before building a model or loader."""

from dataclasses import dataclass

from data_pipeline.manifest import SPLITS, load_manifest
from data_pipeline.order import windows_in


@dataclass
class DatasetInfo:
    vocab_size: int
    eod_id: int
    pad_id: int
    dtype: str
    fingerprint: str
    tokens: dict[str, int]  # per split
    documents: dict[str, int]
    shards: dict[str, int]
    tokenizer: dict


def dataset_info(data_dir: str) -> DatasetInfo:
    manifest = load_manifest(data_dir)
    tok = manifest.tokenizer
    return DatasetInfo(
        vocab_size=tok["vocab_size"],
        eod_id=tok["eod_id"],
        pad_id=tok["pad_id"],
        dtype=manifest.dtype,
        fingerprint=manifest.fingerprint,
        tokens={split: manifest.splits[split]["tokens"] for split in SPLITS},
        documents={split: manifest.splits[split]["documents"] for split in SPLITS},
        shards={split: manifest.splits[split]["shards"] for split in SPLITS},
        tokenizer=tok,
    )


def count_windows(data_dir: str, split: str, seq_len: int, n_future: int) -> int:
    """Windows (training samples) of one epoch of `split` for this window shape."""
    manifest = load_manifest(data_dir)
    return sum(windows_in(s.tokens, seq_len, n_future) for s in manifest.split_shards(split))

"""Held-out text for the loss and acceptance suites: a prepared split, or the stdlib files the default corpus holds out.

With a prepared data directory (`mtp prepare`), windows come from the
chosen split through the training loader: the same seeded order, windows
of seq_len + n_future tokens at stride seq_len, so one epoch holds every
token of the split once. Without one, the acceptance suite cuts windows
from the held-out files of the stdlib corpus (recomputed, as `mtp bench
speculative` does), so an exported model file alone is enough.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.errors import UserError


@dataclass(frozen=True)
class Split:
    data_dir: str
    split: str
    windows_per_epoch: int
    bytes_per_token: float  # source bytes / tokens of the prepared corpus (the manifest's counts)


def open_split(data_dir: str, split: str, tokenizer, seq_len: int, n_future: int, batch_size: int):
    """(StreamingLoader over `split`, Split) after checking the data was tokenized like the model's."""
    from data_pipeline.loader import StreamingLoader
    from data_pipeline.manifest import load_manifest

    if not (Path(data_dir) / "manifest.json").is_file():
        raise UserError(f"--data {data_dir} has no manifest.json; pass a directory written by `mtp prepare`")
    manifest = load_manifest(data_dir)
    saved = {k: v for k, v in manifest.tokenizer.items() if k in tokenizer.describe()}
    if saved != tokenizer.describe():
        raise UserError(f"--data {data_dir} was tokenized with {json.dumps(manifest.tokenizer)}, not the model's "
                        f"tokenizer {json.dumps(tokenizer.describe())}; pass data prepared with the model's tokenizer")
    loader = StreamingLoader(data_dir, split, seq_len, n_future, batch_size, batch_size, num_workers=0)
    tokens = sum(s.tokens for s in manifest.shards)
    return loader, Split(data_dir, split, loader.windows_per_epoch, manifest.source["bytes"] / max(tokens, 1))


def split_windows(loader, count: int) -> torch.Tensor:
    """The first `count` input windows [count, seq_len] of the loader's order."""
    rows, batches = [], iter(loader)
    while sum(len(r) for r in rows) < count:
        rows.append(next(batches)["input_ids"])
    return torch.cat(rows)[:count]


def heldout_windows(tokenizer, count: int, length: int) -> torch.Tensor:
    """`count` windows [count, length] of the held-out stdlib files (as `mtp bench speculative` cuts its prompts)."""
    from pretrain.inference.prompts import benchmark_prompts

    return torch.tensor(benchmark_prompts(tokenizer, count, length, seed=1))


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    return nats_per_token / math.log(2) / bytes_per_token

"""The trainer's one door into the data: sources from the config, loaders, per-source figures.

The trainer knows a loader's interface (iteration, `micro_batches_per_step`,
`state_dict`/`load_state_dict`) and nothing about mixtures; what a mixture adds
(tokens per source, validation per source, one weighted validation loss) is
computed here from the data config. Torch is imported only by the loader itself,
so the config check (`check_sources`) stays fast.
"""

import os
from dataclasses import dataclass

from data_pipeline.manifest import SPLITS, load_manifest
from data_pipeline.mixture import check_weights
from data_pipeline.order import windows_in
from pretrain.errors import UserError

LOADER_BLOCK_SHARDS = 4


@dataclass(frozen=True)
class SourceSpec:
    """One entry of `data.sources` (or `data.dir` alone), with its name filled in."""

    dir: str
    weight: float
    name: str


def source_specs(data_cfg) -> list[SourceSpec]:
    """`data.sources` as specs; with none, `data.dir` as the one source of weight 1."""
    entries = data_cfg.sources or [None]
    specs = []
    for entry in entries:
        directory = data_cfg.dir if entry is None else entry.dir
        weight = 1.0 if entry is None else entry.weight
        name = (entry.name if entry is not None and entry.name else None) or _default_name(directory)
        specs.append(SourceSpec(directory, weight, name))
    return specs


def _default_name(location: str) -> str:
    return os.path.basename(os.path.normpath(location.replace("{name}", "").rstrip("/"))) or "data"


def tokenizer_location(data_cfg) -> str:
    """Where the run's tokenizer lives: every source has the same one (check_sources), the first is used."""
    return source_specs(data_cfg)[0].dir


def open_loader(data_cfg, split: str, seq_len: int, n_future: int, micro_batch_size: int, global_batch_size: int,
                dp_rank: int, dp_size: int, source: str | None = None):
    """The loader of `split` over every source (mixed by weight), or over the one named `source`."""
    from data_pipeline.loader import Source, StreamingLoader

    specs = source_specs(data_cfg)
    if source is not None:
        specs = [s for s in specs if s.name == source]
        if not specs:
            raise UserError(f"no data source named {source!r}; names: {', '.join(s.name for s in source_specs(data_cfg))}")
    return StreamingLoader([Source(s.dir, s.weight, s.name) for s in specs], split, seq_len, n_future,
                           micro_batch_size, global_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=data_cfg.seed,
                           num_workers=data_cfg.num_workers, on_bad_shard=data_cfg.on_bad_shard,
                           block_shards=LOADER_BLOCK_SHARDS)


def source_metrics(loader) -> dict[str, float]:
    """`tokens/<source>`: input tokens each source has delivered, for metrics.jsonl and MLflow."""
    return {f"tokens/{name}": float(tokens) for name, tokens in loader.tokens_by_source().items()}


def weighted_validation(data_cfg, per_source: dict[str, list[float]]) -> list[float]:
    """Every head's validation loss weighted over the sources by their mixture weights (one source: its own)."""
    specs = source_specs(data_cfg)
    total = sum(s.weight for s in specs)
    heads = len(per_source[specs[0].name])
    return [sum(s.weight / total * per_source[s.name][k] for s in specs) for k in range(heads)]


def validation_metrics(per_source: dict[str, list[float]]) -> dict[str, float]:
    """`val_loss/<source>`: each source's validation loss, averaged over the heads."""
    return {f"val_loss/{name}": sum(v) / len(v) for name, v in per_source.items()}


def check_sources(data_cfg, seq_len: int, n_future: int) -> None:
    """Before any process group: every source prepared, one tokenizer, positive weights, a window in each split."""
    specs = source_specs(data_cfg)
    names = [s.name for s in specs]
    check_weights([s.weight for s in specs])
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two data.sources are named {dup!r}; give each a distinct name: (e.g. name: {dup}-2)")
    first = None
    for index, spec in enumerate(specs):
        where = "data.dir" if not data_cfg.sources else f"data.sources[{index}].dir"
        manifest = _manifest(spec, where)
        if first is not None and manifest.tokenizer != first[1].tokenizer:
            from data_pipeline.parts import tokenizer_name

            raise UserError(
                f"{where} was prepared with another tokenizer ({tokenizer_name(manifest.tokenizer)}) than "
                f"data.sources[0] ({tokenizer_name(first[1].tokenizer)}); prepare every source with the same "
                f"--tokenizer (e.g. --tokenizer {first[0].dir})"
            )
        first = first or (spec, manifest)
        for split in SPLITS:
            windows = sum(windows_in(s.tokens, seq_len, n_future) for s in manifest.split_shards(split))
            if windows == 0:
                raise UserError(
                    f"{where}: its {split} split ({manifest.splits[split]['tokens']} tokens) is too small for one "
                    f"window of train.seq_len + model.n_future = {seq_len + n_future} tokens; lower train.seq_len "
                    "or prepare more data"
                )


def _manifest(spec: SourceSpec, where: str):
    from data_pipeline import locations

    if not locations.is_url(spec.dir) and not os.path.isfile(os.path.join(spec.dir, "manifest.json")):
        raise UserError(
            f"no prepared data at {where}={spec.dir} ({os.path.join(spec.dir, 'manifest.json')} is missing); run "
            f"`mtp prepare --source stdlib --tokenizer byte --out {spec.dir}` or point it at prepared shards"
        )
    return load_manifest(spec.dir)

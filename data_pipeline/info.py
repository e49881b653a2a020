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


def mixture_plan(config_path: str, overrides: list[str], tokens: float | None) -> dict:
    """What a run config's data would deliver over `tokens` training tokens: per source, its share,
    tokens and epochs (exact: the same mixture function the loader uses)."""
    from data_pipeline.feed import check_sources, source_specs
    from data_pipeline.mixture import Mixture
    from pretrain.config import load_config
    from pretrain.errors import UserError

    cfg = load_config(config_path, overrides)
    seq_len, n_future = cfg.train.seq_len, cfg.model.n_future
    check_sources(cfg.data, seq_len, n_future)
    if tokens is None:
        tokens = cfg.train.max_steps * cfg.train.global_batch_size * seq_len
    if tokens <= 0:
        raise UserError(f"--tokens must be > 0, got {tokens:g}")
    specs = source_specs(cfg.data)
    windows = int(tokens // seq_len)
    counts = Mixture([s.weight for s in specs], cfg.data.seed).consumed(windows) if len(specs) > 1 else [windows]
    total_weight = sum(s.weight for s in specs)
    rows = []
    for spec, count in zip(specs, counts):
        per_epoch = count_windows(spec.dir, "train", seq_len, n_future)
        rows.append({"name": spec.name, "dir": spec.dir, "weight": spec.weight, "share": spec.weight / total_weight,
                     "tokens": int(count) * seq_len, "windows": int(count), "windows_per_epoch": per_epoch,
                     "epochs": int(count) / per_epoch,
                     "train_tokens": load_manifest(spec.dir).splits["train"]["tokens"]})
    return {"tokens": windows * seq_len, "seq_len": seq_len, "n_future": n_future, "seed": cfg.data.seed,
            "sources": rows}


def plan_text(plan: dict) -> str:
    lines = [f"plan for {plan['tokens']:,} training tokens (seq_len {plan['seq_len']}, n_future {plan['n_future']}, "
             f"seed {plan['seed']}):",
             f"{'source':<20} {'weight':>8} {'share':>7} {'tokens':>16} {'epochs':>8}  dir"]
    for row in plan["sources"]:
        lines.append(f"{row['name']:<20} {row['weight']:>8g} {row['share']:>7.2%} {row['tokens']:>16,} "
                     f"{row['epochs']:>8.3f}  {row['dir']}")
    return "\n".join(lines)

"""`mtp prepare`: documents -> tokenizer -> token shards + manifest, all or nothing.

The corpus is streamed: files are listed lazily, each is read once from start to
end by a worker, and every document is assigned to train or val (and, with
`--part I/N`, to a part) by a stable hash of its identity, so memory does not grow
with the number of documents. The parent only packs the workers' token arrays into
samples (a memcpy) and hands full shards to a writer thread.

The output directory is built under a hidden temporary name beside `--out` and
renamed into place only when every shard and the manifest are written, so a crash
or a bad input never leaves a half data set, and an existing data set is replaced
only after the new one is complete (and only with `--overwrite`). `--part` runs
write into one shared `--out` instead; see parts.py.
"""

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field

from data_pipeline import tokenize_worker
from data_pipeline.assign import WHOLE, Assigner, PartSpec, parse_part
from data_pipeline.manifest import Manifest, ShardInfo, write_manifest
from data_pipeline.progress import Progress, human
from data_pipeline.shards import SplitWriter
from data_pipeline.sources import check_sources, iter_files
from data_pipeline.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer_path, parse_spec, train_bpe
from pretrain.errors import UserError

BPE_TRAIN_BYTES = 1 << 28  # BPE learns its merges from at most this much training text


@dataclass
class PrepareConfig:
    out: str
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str = "byte"
    shard_tokens: int = 1 << 24
    sample_tokens: int = 1 << 20
    val_fraction: float = 0.01
    workers: int = 1
    include: list[str] | None = None
    text_key: str = "text"
    overwrite: bool = False
    seed: int = 0
    part: str | None = None  # "I/N": prepare part I of N into the shared --out

    def validate(self) -> PartSpec:
        checks = [
            (self.shard_tokens >= 1, "--shard-tokens must be >= 1"),
            (self.sample_tokens >= 1, "--sample-tokens must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1), e.g. 0.01"),
            (self.workers >= 1, "--workers must be >= 1"),
            (self.seed >= 0, "--seed must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        kind, _ = parse_spec(self.tokenizer)
        part = parse_part(self.part) if self.part else WHOLE
        if part.count > 1 and kind == "bpe":
            raise UserError(f"--tokenizer {self.tokenizer} with --part: every part would learn its own BPE; "
                            "train it once (mtp prepare --tokenizer bpe:N on the corpus or a sample of it) and pass "
                            "that directory or its tokenizer.json as --tokenizer PATH to every part")
        return part

    def settings(self) -> dict:
        """What every part of one preparation must share (checked by `mtp data merge`)."""
        return {"sources": self.sources, "include": self.include, "text_key": self.text_key, "seed": self.seed,
                "val_fraction": self.val_fraction, "shard_tokens": self.shard_tokens,
                "sample_tokens": self.sample_tokens}


@dataclass
class BuildStats:
    """What building one part (or the whole) found; summed over parts by `mtp data merge`."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    replaced_utf8: int = 0  # documents whose invalid UTF-8 became U+FFFD
    skipped_binary: int = 0
    tokens: int = 0
    seconds: float = 0.0  # wall clock of reading, tokenizing, packing and writing
    tokenize_cpu_seconds: float = 0.0  # CPU time of the tokenizer processes alone
    parent_cpu_seconds: float = 0.0  # CPU time of the packing and writing process (all its threads)


@dataclass
class PrepareResult:
    out: str
    manifest: Manifest  # of the whole data set, or of this part
    stats: BuildStats
    seconds: float
    part: PartSpec = WHOLE
    merged: bool = True  # False: a part, and the data set still waits for other parts

    @property
    def tokens(self) -> int:
        return self.stats.tokens

    @property
    def documents(self) -> int:
        return self.stats.documents

    @property
    def source_bytes(self) -> int:
        return self.stats.text_bytes

    def summary(self) -> str:
        splits, st = self.manifest.splits, self.stats
        notes = ""
        if st.replaced_utf8 or st.skipped_binary:
            notes = f" ({st.replaced_utf8} documents had invalid UTF-8 replaced, {st.skipped_binary} binary files skipped)"
        what = self.out if self.part.count == 1 else f"part {self.part} of {self.out}"
        line = (
            f"prepared {what}: {st.documents} documents (train {splits['train']['documents']}, "
            f"val {splits['val']['documents']}), {human(st.tokens)} tokens in {len(self.manifest.shards)} shards, "
            f"{st.text_bytes / max(st.tokens, 1):.2f} bytes/token, {self.seconds:.1f} s, "
            f"{human(st.tokens / max(st.seconds, 1e-9))} tokens/s{notes}"
        )
        if self.part.count > 1:
            line += "; all parts done, manifest written" if self.merged else "; `mtp data merge` once every part is done"
        return line


def prepare(cfg: PrepareConfig, progress_stream=None) -> PrepareResult:
    """Build the data set described by `cfg` at `cfg.out` (or, with `cfg.part`, one part of it)."""
    part = cfg.validate()
    check_sources(cfg.sources)
    if part.count > 1:
        from data_pipeline.parts import prepare_part

        return prepare_part(cfg, part, progress_stream)
    start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    _check_output(out, cfg.overwrite)
    tokenizer = build_tokenizer(cfg)
    temp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    os.makedirs(temp)
    try:
        description = save_tokenizer(tokenizer, temp)
        shards, stats = build(cfg, tokenizer, temp, WHOLE, progress_stream)
        manifest = make_manifest(cfg, description, shards, stats, parts=1)
        check_usable(manifest, cfg.val_fraction, cfg.out)
        write_manifest(temp, manifest)
        _publish(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return PrepareResult(out=out, manifest=manifest, stats=stats, seconds=time.perf_counter() - start)


def build(cfg: PrepareConfig, tokenizer: Tokenizer, directory: str, part: PartSpec,
          progress_stream=None) -> tuple[list[ShardInfo], BuildStats]:
    """Tokenize the documents `part` owns over `cfg.workers` processes and write both splits' shards."""
    start, parent_cpu = time.perf_counter(), time.process_time()
    dtype = token_dtype(tokenizer.vocab_size)
    tag = part.tag if part.count > 1 else ""
    writers = {split: SplitWriter(directory, split, dtype, cfg.shard_tokens, cfg.sample_tokens, tokenizer.eod_id, tag)
               for split in ("train", "val")}
    init = tokenize_worker.WorkerInit(tokenizer.describe(), _hf_json(tokenizer), cfg.text_key, dtype, cfg.seed,
                                      cfg.val_fraction, part)
    stats = BuildStats()
    progress = Progress("prepare" if part.count == 1 else f"prepare part {part}", stream=progress_stream)
    try:
        for chunk in tokenize_worker.run(init, tokenize_worker.units(_counted(cfg, stats)), cfg.workers):
            for split, tokens in chunk.tokens.items():
                writers[split].add(tokens)
                stats.tokens += len(tokens)
            stats.documents += sum(chunk.documents.values())
            stats.text_bytes += chunk.text_bytes
            stats.replaced_utf8 += chunk.replaced
            stats.skipped_binary += chunk.binary
            stats.tokenize_cpu_seconds += chunk.cpu_seconds
            progress.update(stats.documents, stats.tokens)
        shards = [s for split in ("train", "val") for s in writers[split].close()]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    progress.close()
    stats.seconds = time.perf_counter() - start
    stats.parent_cpu_seconds = time.process_time() - parent_cpu
    return shards, stats


def _counted(cfg: PrepareConfig, stats: BuildStats):
    for file in iter_files(cfg.sources, cfg.include):
        stats.files += 1
        yield file


def make_manifest(cfg: PrepareConfig, tokenizer_description: dict, shards: list[ShardInfo], stats: BuildStats,
                  parts: int) -> Manifest:
    manifest = Manifest(
        tokenizer=tokenizer_description,
        dtype=token_dtype(tokenizer_description["vocab_size"]),
        shards=shards,
        source={"description": " ".join(cfg.sources), "files": stats.files, "documents": stats.documents,
                "bytes": stats.text_bytes, "settings": cfg.settings()},
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        shard_tokens=cfg.shard_tokens,
        sample_tokens=min(cfg.sample_tokens, cfg.shard_tokens),
        parts=parts,
    )
    manifest.finalize()
    return manifest


def check_usable(manifest: Manifest, val_fraction: float, out: str) -> None:
    """A data set the trainer can use: documents in train, and in val unless none were asked for."""
    splits = manifest.splits
    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        raise UserError(f"no documents found for --out {out}; check the --source paths and --include globs")
    if splits["train"]["documents"] == 0:
        raise UserError(f"every document of --out {out} fell into val; lower --val-fraction or add data")
    if val_fraction > 0 and splits["val"]["documents"] == 0:
        raise UserError(
            f"no document of the {splits['train']['documents']} fell into val (each goes there with probability "
            f"--val-fraction {val_fraction}, by a hash of its name); raise --val-fraction, try another --seed or add data"
        )


def build_tokenizer(cfg: PrepareConfig) -> Tokenizer:
    kind, arg = parse_spec(cfg.tokenizer)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return load_tokenizer_path(arg)
    return train_bpe(_training_texts(cfg), arg)


class _TrainSample:
    """An assigner that keeps a stable `rate` share of the training documents (for BPE)."""

    def __init__(self, cfg: PrepareConfig, rate: float):
        self.assigner = Assigner(cfg.seed, cfg.val_fraction)
        self.rate = rate

    def split_of(self, identity: str) -> str | None:
        if self.assigner.split_of(identity) != "train" or not self.assigner.sampled(identity, self.rate):
            return None
        return "train"


def _training_texts(cfg: PrepareConfig):
    """At most BPE_TRAIN_BYTES of training text, sampled from all over the corpus by hash."""
    listed = sum(f.size for f in iter_files(cfg.sources, cfg.include))
    sample = _TrainSample(cfg, min(1.0, BPE_TRAIN_BYTES / max(listed, 1)))
    budget = BPE_TRAIN_BYTES
    stats = tokenize_worker.DocStats()
    for file in iter_files(cfg.sources, cfg.include):
        for _, text in tokenize_worker.file_documents(file, sample, cfg.text_key, stats):
            if budget <= 0:
                return
            budget -= len(text)
            yield text


def token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> dict:
    """Write the tokenizer files into `directory`; its description with their sha256 (for the manifest)."""
    tokenizer.save(directory)
    return {**tokenizer.describe(), "files": file_hashes(directory)}


def _hf_json(tokenizer: Tokenizer) -> str | None:
    return tokenizer.to_json() if hasattr(tokenizer, "to_json") else None


def file_hashes(directory: str) -> dict[str, str]:
    """sha256 of every file in `directory` (called when it holds only the tokenizer)."""
    hashes = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; choose a directory path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} already holds files; pass --overwrite to replace them or choose another --out")
    os.makedirs(os.path.dirname(out), exist_ok=True)


def _publish(temp: str, out: str) -> None:
    """Move the finished directory into place; an old one is removed only after the swap."""
    if not os.path.isdir(out):
        os.rename(temp, out)
        return
    old = f"{temp}.old"
    os.rename(out, old)
    os.rename(temp, out)
    shutil.rmtree(old)

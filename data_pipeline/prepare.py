"""`mtp prepare`: documents -> tokenizer -> token shards + manifest, all or nothing.

The output directory is built under a hidden temporary name beside `--out` and
renamed into place only when every shard and the manifest are written, so a crash
or a bad input never leaves a half data set, and an existing data set is replaced
only after the new one is complete (and only with `--overwrite`).
"""

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import tokenize_worker
from data_pipeline.manifest import MANIFEST_FILE, Manifest
from data_pipeline.progress import Progress, human
from data_pipeline.rng import permutation
from data_pipeline.shards import SplitWriter
from data_pipeline.sources import Corpus, list_documents, read_document
from data_pipeline.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    load_tokenizer_path,
    parse_spec,
    train_bpe,
)
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

    def validate(self) -> None:
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
        parse_spec(self.tokenizer)


@dataclass
class PrepareResult:
    out: str
    manifest: Manifest
    documents: int
    source_bytes: int
    replaced_utf8: int  # documents whose invalid UTF-8 became U+FFFD
    skipped_binary: int
    seconds: float
    tokenize_seconds: float  # wall clock of tokenizing, packing and writing
    tokenize_cpu_seconds: float  # CPU time of the tokenizer processes alone

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.manifest.shards)

    def summary(self) -> str:
        splits = self.manifest.splits
        notes = ""
        if self.replaced_utf8 or self.skipped_binary:
            notes = f" ({self.replaced_utf8} documents had invalid UTF-8 replaced, {self.skipped_binary} binary files skipped)"
        return (
            f"prepared {self.out}: {self.documents} documents (train {splits['train']['documents']}, "
            f"val {splits['val']['documents']}), {human(self.tokens)} tokens in {len(self.manifest.shards)} shards, "
            f"{self.source_bytes / max(self.tokens, 1):.2f} bytes/token, {self.seconds:.1f} s, "
            f"{human(self.tokens / max(self.tokenize_seconds, 1e-9))} tokens/s{notes}"
        )


def prepare(cfg: PrepareConfig, progress_stream=None) -> PrepareResult:
    """Build the data set described by `cfg` at `cfg.out`."""
    start = time.perf_counter()
    cfg.validate()
    out = os.path.abspath(cfg.out)
    _check_output(out, cfg.overwrite)
    corpus = list_documents(cfg.sources, cfg.include)
    val_docs, train_docs = split_documents(len(corpus.docs), cfg.val_fraction, cfg.seed)
    tokenizer = build_tokenizer(cfg.tokenizer, corpus, train_docs, cfg.text_key)
    temp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    os.makedirs(temp)
    try:
        tokenizer.save(temp)
        description = {**tokenizer.describe(), "files": _file_hashes(temp)}
        stats = _tokenize_and_write(cfg, corpus, tokenizer, {"val": val_docs, "train": train_docs}, temp, progress_stream)
        stats["manifest"] = _write_manifest(cfg, corpus, description, stats.pop("shards"), temp)
        _publish(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return PrepareResult(out=out, documents=len(corpus.docs), source_bytes=corpus.source_bytes,
                         skipped_binary=corpus.skipped_binary, seconds=time.perf_counter() - start, **stats)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of the documents; the first share goes to val. Returns (val, train) indices.

    The shuffled order is also the order documents are packed in, so each shard
    mixes files from all over the corpus instead of one directory.
    """
    order = permutation(n_docs, seed)
    n_val = max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0
    if n_val >= n_docs:
        raise UserError(f"--val-fraction {val_fraction} leaves no training document out of {n_docs}; lower it or add data")
    return order[:n_val], order[n_val:]


def build_tokenizer(spec: str, corpus: Corpus, train_docs: np.ndarray, text_key: str) -> Tokenizer:
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return load_tokenizer_path(arg)
    return train_bpe(_training_texts(corpus, train_docs, text_key), arg)


def _training_texts(corpus: Corpus, train_docs: np.ndarray, text_key: str):
    budget = BPE_TRAIN_BYTES
    for i in train_docs:
        doc = corpus.docs[i]
        if budget <= 0:
            return
        budget -= doc.end - doc.start
        yield read_document(corpus.paths[doc.file], doc, text_key)[0]


def token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def _tokenize_and_write(cfg, corpus, tokenizer, split_docs, temp, progress_stream) -> dict:
    """Tokenize every document over `cfg.workers` processes and pack the ids into each split's shards."""
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    writers = {split: SplitWriter(temp, split, dtype, cfg.shard_tokens, cfg.sample_tokens, tokenizer.eod_id)
               for split in split_docs}
    tasks = [(split, batch) for split, docs in split_docs.items()
             for batch in tokenize_worker.batches([corpus.docs[i] for i in docs])]
    init = tokenize_worker.WorkerInit(tokenizer.describe(), _hf_json(tokenizer), corpus.paths, cfg.text_key, dtype)
    results = tokenize_worker.run(init, [batch for _, batch in tasks], cfg.workers)
    progress = Progress("prepare", len(corpus.docs), stream=progress_stream)
    done_docs = done_tokens = replaced = 0
    cpu = 0.0
    for (split, _), (arrays, n_replaced, cpu_seconds) in zip(tasks, results):
        for tokens in arrays:
            writers[split].add(np.concatenate([tokens, eod]))
            done_tokens += len(tokens) + 1
        done_docs += len(arrays)
        replaced += n_replaced
        cpu += cpu_seconds
        progress.update(done_docs, done_tokens)
    progress.close()
    shards = [s for split in ("train", "val") for s in writers[split].close()]
    return {"shards": shards, "replaced_utf8": replaced, "tokenize_seconds": time.perf_counter() - start,
            "tokenize_cpu_seconds": cpu}


def _hf_json(tokenizer: Tokenizer) -> str | None:
    return tokenizer.to_json() if hasattr(tokenizer, "to_json") else None


def _write_manifest(cfg, corpus, tokenizer_description: dict, shards, temp) -> Manifest:
    manifest = Manifest(
        tokenizer=tokenizer_description,
        dtype=token_dtype(tokenizer_description["vocab_size"]),
        shards=shards,
        source={"description": corpus.description, "files": len(corpus.paths),
                "documents": len(corpus.docs), "bytes": corpus.source_bytes},
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        shard_tokens=cfg.shard_tokens,
        sample_tokens=cfg.sample_tokens,
    )
    manifest.finalize()
    path = os.path.join(temp, MANIFEST_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    os.replace(path + ".tmp", path)
    return manifest


def _file_hashes(directory: str) -> dict[str, str]:
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

"""`mtp bench data`: tokenization and streaming throughput on a real corpus.

Tokenization is timed inside `prepare`: the wall clock of reading, tokenizing
over K processes, packing and writing shards, and separately the CPU time the
tokenizer processes spent, which gives a per-worker rate that other jobs on a
shared machine do not distort. Streaming is the rate at which `StreamingLoader`
hands finished micro-batches (inputs and all n_future label rows) to a consumer
that does nothing else, i.e. the most a trainer could ever ask of it.
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.progress import human


@dataclass
class DataBenchConfig:
    sources: list[str]
    tokenizer: str = "byte"
    workers: int = 2
    seq_len: int = 2048
    n_future: int = 4
    micro_batch_size: int = 8
    stream_tokens: int = 200_000_000
    loader_workers: int = 1


@dataclass
class DataBenchResult:
    documents: int
    tokens: int
    workers: int
    tokenize_seconds: float
    tokenize_tokens_per_s: float  # wall clock, all workers
    tokenize_tokens_per_s_per_worker: float  # tokens per CPU second of a tokenizer process
    parent_tokens_per_cpu_s: float  # tokens per CPU second of the packing/writing process: its ceiling
    stream_tokens: int
    stream_seconds: float
    stream_first_batch_seconds: float
    stream_tokens_per_s: float
    seq_len: int
    n_future: int
    micro_batch_size: int


def run_data_bench(cfg: DataBenchConfig) -> DataBenchResult:
    with tempfile.TemporaryDirectory(prefix="mtp-bench-data-") as tmp:
        out = os.path.join(tmp, "data")
        prepared = prepare(PrepareConfig(out=out, sources=cfg.sources, tokenizer=cfg.tokenizer, workers=cfg.workers,
                                         val_fraction=0.0))  # streaming reads train only
        first, seconds, delivered = stream(out, cfg)
    return DataBenchResult(
        documents=prepared.documents,
        tokens=prepared.tokens,
        workers=cfg.workers,
        tokenize_seconds=prepared.stats.seconds,
        tokenize_tokens_per_s=prepared.tokens / prepared.stats.seconds,
        tokenize_tokens_per_s_per_worker=prepared.tokens / prepared.stats.tokenize_cpu_seconds,
        parent_tokens_per_cpu_s=prepared.tokens / prepared.stats.parent_cpu_seconds,
        stream_tokens=delivered,
        stream_seconds=seconds,
        stream_first_batch_seconds=first,
        stream_tokens_per_s=delivered / seconds,
        seq_len=cfg.seq_len,
        n_future=cfg.n_future,
        micro_batch_size=cfg.micro_batch_size,
    )


def stream(data, cfg: DataBenchConfig) -> tuple[float, float, int]:
    """(seconds to the first micro-batch, seconds for the rest, input tokens in the rest) of a
    data set location or a list of `Source`s."""
    from data_pipeline.loader import StreamingLoader

    loader = StreamingLoader(data, "train", cfg.seq_len, cfg.n_future, cfg.micro_batch_size,
                             cfg.micro_batch_size, num_workers=cfg.loader_workers)
    per_batch = cfg.micro_batch_size * cfg.seq_len
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    wanted = max(1, cfg.stream_tokens // per_batch)
    start = time.perf_counter()
    for _ in range(wanted):
        next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return first, seconds, wanted * per_batch


def report(result: DataBenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result), indent=1)
    r = result
    return "\n".join([
        f"corpus: {r.documents} documents, {human(r.tokens)} tokens",
        f"tokenize: {human(r.tokenize_tokens_per_s)} tokens/s wall clock with {r.workers} workers "
        f"({r.tokenize_seconds:.1f} s); {human(r.tokenize_tokens_per_s_per_worker)} tokens/s per worker CPU second; "
        f"packing/writing process {human(r.parent_tokens_per_cpu_s)} tokens per CPU second",
        f"stream: {human(r.stream_tokens_per_s)} tokens/s (seq_len {r.seq_len}, n_future {r.n_future}, "
        f"micro-batch {r.micro_batch_size}; {human(r.stream_tokens)} tokens in {r.stream_seconds:.2f} s, "
        f"first batch after {r.stream_first_batch_seconds:.2f} s)",
    ])

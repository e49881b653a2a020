"""Tokenization in worker processes, results returned in submission order.

Workers are started with `spawn` (no fork of a parent that may hold threads, e.g.
BPE training's thread pool or torch's), get the tokenizer and the file list once,
then each task is a batch of document references: workers read the files
themselves, so only token ids cross process boundaries. `imap` keeps the order of
the batches, so the shards are identical whatever the number of workers.
"""

import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.sources import DocRef, read_document
from data_pipeline.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, hf_from_json

BATCH_BYTES = 1 << 20  # source bytes per task: large enough to amortise IPC, small enough to balance
BATCH_DOCS = 4096


@dataclass
class WorkerInit:
    tokenizer: dict  # Tokenizer.describe()
    hf_json: str | None  # tokenizer.json text for BPE / HF tokenizers
    paths: list[str]
    text_key: str
    dtype: str


_state: dict = {}


def batches(docs: list[DocRef]) -> Iterator[list[DocRef]]:
    """Consecutive runs of documents of about BATCH_BYTES each."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc.end - doc.start
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def run(init: WorkerInit, tasks: list[list[DocRef]], workers: int) -> Iterator[tuple[list[np.ndarray], int, float]]:
    """(token arrays, documents with replaced UTF-8, CPU seconds spent) per task, in task order."""
    if workers == 1:
        _init(init)
        yield from map(_tokenize, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_process, initargs=(init,)) as pool:
        yield from pool.imap(_tokenize, tasks)


def _init_process(init: WorkerInit) -> None:
    # One process per core already; the tokenizers library's own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init(init)


def _init(init: WorkerInit) -> None:
    _state["init"] = init
    _state["tokenizer"] = _rebuild(init)


def _rebuild(init: WorkerInit) -> Tokenizer:
    if init.tokenizer["type"] == "byte":
        return ByteTokenizer()
    desc = init.tokenizer
    return hf_from_json(init.hf_json, "worker", desc["type"], desc["eod_token"], desc["pad_token"])


def _tokenize(batch: list[DocRef]) -> tuple[list[np.ndarray], int, float]:
    """Read and tokenize one batch; the CPU time lets benchmarks on a shared machine
    report a per-worker rate that other processes' load does not distort."""
    cpu_start = time.process_time()
    init: WorkerInit = _state["init"]
    tokenizer: Tokenizer = _state["tokenizer"]
    texts, replaced = [], 0
    for doc in batch:
        text, was_replaced = read_document(init.paths[doc.file], doc, init.text_key)
        texts.append(text)
        replaced += was_replaced
    if isinstance(tokenizer, HFTokenizer):
        arrays = [np.asarray(ids, dtype=init.dtype) for ids in tokenizer.encode_batch(texts)]
    else:
        arrays = [tokenizer.encode_array(text, init.dtype) for text in texts]
    return arrays, replaced, time.process_time() - cpu_start

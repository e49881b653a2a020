"""Reading and tokenizing in worker processes, results streamed back in corpus order.

The file stream is cut into units (consecutive files of about `UNIT_BYTES`, or one
bigger file). Unit u goes to worker u mod K, which reads its files sequentially,
keeps the documents this part owns (assign.py), tokenizes them and sends back
chunks of about `CHUNK_TOKENS` tokens: one array per split with each
document followed by eod, ready to be packed. Each worker has its own bounded
result queue and the parent reads unit 0 from worker 0, unit 1 from worker 1, and
so on, so the stream is in corpus order whatever K (the shards are byte-identical
for any `--workers`), a huge file never has to fit in memory (its chunks wait in
a queue of `QUEUE_CHUNKS`), and a worker may run ahead by a few chunks.

Workers are started with `spawn` (no fork of a parent that may hold threads, e.g.
BPE training's thread pool); only token arrays cross process boundaries.
"""

import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.assign import Assigner, PartSpec
from data_pipeline.formats import iter_records
from data_pipeline.sources import SourceFile, read_whole, record_prefix
from data_pipeline.tokenizer import ByteTokenizer, Tokenizer, hf_from_json
from pretrain.errors import UserError

UNIT_BYTES = 1 << 22  # files per task: enough to amortise a queue round trip, small enough to balance
CHUNK_TOKENS = 1 << 20  # tokens per message back to the parent (2 MiB of uint16)
ENCODE_CHARS = 1 << 20  # characters handed to the tokenizer per call
QUEUE_CHUNKS = 4  # chunks a worker may have waiting for the parent
SPLITS = ("train", "val")


@dataclass
class WorkerInit:
    tokenizer: dict  # Tokenizer.describe()
    hf_json: str | None  # tokenizer.json text for BPE / HF tokenizers
    text_key: str
    dtype: str
    seed: int
    val_fraction: float
    part: PartSpec


@dataclass
class Unit:
    index: int
    files: list[SourceFile]


@dataclass
class Chunk:
    unit: int
    last: bool  # the unit's final chunk
    tokens: dict[str, np.ndarray]  # split -> [n] documents, each followed by eod
    documents: dict[str, int]
    text_bytes: int = 0  # UTF-8 bytes of the documents tokenized
    replaced: int = 0  # documents whose invalid UTF-8 became U+FFFD
    binary: int = 0  # one-document files skipped because they look binary
    cpu_seconds: float = 0.0  # CPU time of the worker for this chunk


@dataclass
class _Failure:
    message: str
    user: bool


_DONE = "done"


def units(files: Iterator[SourceFile]) -> Iterator[Unit]:
    """Consecutive runs of files of about UNIT_BYTES each (a bigger file is a unit alone)."""
    batch, size, index = [], 0, 0
    for file in files:
        batch.append(file)
        size += file.size
        if size >= UNIT_BYTES:
            yield Unit(index, batch)
            batch, size, index = [], 0, index + 1
    if batch:
        yield Unit(index, batch)


@dataclass
class DocStats:
    replaced: int = 0
    binary: int = 0


def file_documents(file: SourceFile, assigner: Assigner, text_key: str,
                   stats: DocStats) -> Iterator[tuple[str, str]]:
    """(split, text) of each document of `file` this part owns, in file order."""
    if not file.records:
        split = assigner.split_of(file.identity)
        if split is None:
            return  # another part's document: the file is not even opened
        got = read_whole(file.path)
        if got is None:
            stats.binary += 1
            return
        stats.replaced += got[1]
        yield split, got[0]
        return
    decided: list[str | None] = [None]
    prefix = record_prefix(file)

    def wanted(index: int) -> bool:
        decided[0] = assigner.split_of(f"{prefix}:{index}")
        return decided[0] is not None

    for _, text in iter_records(file.path, text_key, wanted):
        yield decided[0], text


class Processor:
    """Turns a unit into chunks; one per worker process (or the parent with --workers 1)."""

    def __init__(self, init: WorkerInit):
        self.init = init
        self.tokenizer = _rebuild(init)
        self.assigner = Assigner(init.seed, init.val_fraction, init.part)
        self.dtype = np.dtype(init.dtype)

    def process(self, unit: Unit) -> Iterator[Chunk]:
        state = _UnitState(unit.index)
        cpu = time.process_time()
        for file in unit.files:
            for split, text in file_documents(file, self.assigner, self.init.text_key, state.stats):
                state.texts[split].append(text)
                state.chars += len(text)
                if state.chars >= ENCODE_CHARS:
                    self._encode(state)
                    if state.tokens >= CHUNK_TOKENS:
                        yield state.chunk(False, time.process_time() - cpu)
                        cpu = time.process_time()
        self._encode(state)
        yield state.chunk(True, time.process_time() - cpu)

    def _encode(self, state: "_UnitState") -> None:
        for split, texts in state.texts.items():
            if texts:
                array = self.tokenizer.encode_joined(texts, self.dtype)
                state.arrays[split].append(array)
                state.tokens += len(array)
                state.documents[split] += len(texts)
                state.text_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
                texts.clear()
        state.chars = 0


@dataclass
class _UnitState:
    unit: int
    texts: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    arrays: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    stats: DocStats = field(default_factory=DocStats)
    chars: int = 0
    tokens: int = 0
    text_bytes: int = 0

    def chunk(self, last: bool, cpu_seconds: float) -> Chunk:
        tokens = {s: np.concatenate(a) for s, a in self.arrays.items() if a}
        chunk = Chunk(self.unit, last, tokens, dict(self.documents), self.text_bytes, self.stats.replaced,
                      self.stats.binary, cpu_seconds)
        self.arrays = {s: [] for s in SPLITS}
        self.documents = dict.fromkeys(SPLITS, 0)
        self.stats = DocStats()
        self.tokens = self.text_bytes = 0
        return chunk


def run(init: WorkerInit, work: Iterator[Unit], workers: int) -> Iterator[Chunk]:
    """Every chunk of every unit, in unit order, tokenized over `workers` processes."""
    if workers == 1:
        processor = Processor(init)
        for unit in work:
            yield from processor.process(unit)
        return
    pool = _Pool(init, workers)
    try:
        pool.start(work)
        yield from pool.results()
    finally:
        pool.close()


class _Pool:
    """K worker processes, a task queue and a bounded result queue each, fed round-robin."""

    def __init__(self, init: WorkerInit, workers: int):
        context = multiprocessing.get_context("spawn")
        self.tasks = [context.Queue(2) for _ in range(workers)]
        self.results_q = [context.Queue(QUEUE_CHUNKS) for _ in range(workers)]
        self.procs = [context.Process(target=_worker_main, args=(init, t, r), daemon=True, name=f"tokenizer-{i}")
                      for i, (t, r) in enumerate(zip(self.tasks, self.results_q))]
        self.stop = threading.Event()
        self.feed_error: BaseException | None = None

    def start(self, work: Iterator[Unit]) -> None:
        for proc in self.procs:
            proc.start()
        threading.Thread(target=self._feed, args=(work,), name="unit-feeder", daemon=True).start()

    def _feed(self, work: Iterator[Unit]) -> None:
        try:
            for unit in work:
                if not self._put(self.tasks[unit.index % len(self.tasks)], unit):
                    return
        except BaseException as err:  # noqa: BLE001 -- a listing error: raised in the consumer
            self.feed_error = err
        for tasks in self.tasks:
            self._put(tasks, None)

    def _put(self, tasks, item) -> bool:
        while not self.stop.is_set():
            try:
                tasks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def results(self) -> Iterator[Chunk]:
        unit = 0
        while True:
            item = self._get(unit % len(self.procs))
            if isinstance(item, _Failure):
                raise UserError(item.message) if item.user else RuntimeError(f"tokenizer worker failed:\n{item.message}")
            if isinstance(item, str):  # _DONE: this worker has no unit `unit`, so no unit is left
                if self.feed_error is not None:
                    raise self.feed_error
                return
            yield item
            unit += item.last

    def _get(self, worker: int):
        while True:
            try:
                return self.results_q[worker].get(timeout=1.0)
            except queue.Empty:
                if not self.procs[worker].is_alive():
                    try:
                        return self.results_q[worker].get(timeout=1.0)
                    except queue.Empty:
                        code = self.procs[worker].exitcode
                        raise RuntimeError(f"tokenizer worker {worker} died (exit code {code}; out of memory?)") from None

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)


def _worker_main(init: WorkerInit, tasks, results) -> None:
    # One process per core already; the tokenizers library's own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        processor = Processor(init)
        while (unit := tasks.get()) is not None:
            for chunk in processor.process(unit):
                results.put(chunk)
        results.put(_DONE)
    except UserError as err:
        results.put(_Failure(str(err), True))
    except BaseException:  # noqa: BLE001 -- anything else is a bug: the parent shows the worker's traceback
        results.put(_Failure(traceback.format_exc(), False))


def _rebuild(init: WorkerInit) -> Tokenizer:
    if init.tokenizer["type"] == "byte":
        return ByteTokenizer()
    desc = init.tokenizer
    return hf_from_json(init.hf_json, "worker", desc["type"], desc["eod_token"], desc["pad_token"])

"""`mtp bench data --synthetic-docs N ...`: how preparation, mixtures and manifests scale.

- Prepare: a synthetic JSONL corpus of N small documents (random words, about
  `doc_bytes` each, in 16 files) is prepared in a fresh process per N, so each
  peak memory is that run's own: the preparing process's and its largest
  worker's (VmHWM, polled). Memory must not grow with N. Rates: tokens
  per CPU second of a tokenizer worker (what one more worker adds) and tokens
  per CPU second of the packing/writing process (the ceiling it puts on any
  number of workers; before this design it was 11-13M tokens/s).
- Mixture: three sources (weights 5:3:2) streamed by one StreamingLoader, as
  the trainer's loader; the consumer does nothing else.
- Manifest: a manifest of `manifest_shards` shards written in the current form
  and in the version-1 form, each parsed cold (the per-process cache cleared).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from data_pipeline.bench import DataBenchConfig, stream
from data_pipeline.progress import human

SYNTHETIC_FILES = 16
WORDS = 2000


@dataclass
class ScaleBenchConfig(DataBenchConfig):
    """`sources` is unused: the corpora are synthetic. `stream_tokens` is what the mixture streams."""

    sources: list[str] = field(default_factory=list)
    synthetic_docs: list[int] = field(default_factory=list)
    doc_bytes: int = 200
    mixture_docs: int = 60_000  # documents of the heaviest source; the others have 2/3 and 1/2 of it
    manifest_shards: int = 100_000
    shard_tokens: int = 1 << 22  # small enough that every corpus measured fills many shards


@dataclass
class ScaleBenchResult:
    prepare: list[dict] = field(default_factory=list)
    mixture: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def run_scale_bench(cfg: ScaleBenchConfig) -> ScaleBenchResult:
    result = ScaleBenchResult()
    with tempfile.TemporaryDirectory(prefix="mtp-bench-scale-") as tmp:
        for n in cfg.synthetic_docs:
            corpus = write_corpus(os.path.join(tmp, f"corpus-{n}"), n, cfg.doc_bytes, seed=n)
            result.prepare.append(_prepare_in_child(corpus, os.path.join(tmp, f"data-{n}"), cfg))
        result.mixture = _mixture(tmp, cfg)
    result.manifest = manifest_load(cfg.manifest_shards)
    return result


def write_corpus(directory: str, docs: int, doc_bytes: int, seed: int) -> str:
    """`docs` JSONL documents of random words (about `doc_bytes` each) over SYNTHETIC_FILES files."""
    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i:x}" for i in rng.permutation(WORDS)])
    words_per_doc = max(1, doc_bytes // 6)
    for f, chunk in enumerate(np.array_split(np.arange(docs), SYNTHETIC_FILES)):
        with open(os.path.join(directory, f"part-{f:03d}.jsonl"), "w") as out:
            for start in range(0, len(chunk), 10_000):
                n = min(10_000, len(chunk) - start)
                picks = vocabulary[rng.integers(0, WORDS, size=(n, words_per_doc))]
                out.write("".join(json.dumps({"text": " ".join(row)}) + "\n" for row in picks))
    return directory


def _prepare_in_child(corpus: str, out: str, cfg: ScaleBenchConfig) -> dict:
    args = {"sources": [corpus], "out": out, "workers": cfg.workers, "tokenizer": cfg.tokenizer,
            "shard_tokens": cfg.shard_tokens}
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.bench_scale", json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark prepare failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _child_prepare(args: dict) -> dict:
    """Run in a fresh process: prepare, then report rates and this process tree's peak memory."""
    from data_pipeline.prepare import PrepareConfig, prepare

    before = vm_hwm_mb(os.getpid())
    workers = _WorkerPeaks()
    workers.start()
    result = prepare(PrepareConfig(val_fraction=0.01, **args), progress_stream=open(os.devnull, "w"))
    workers.stop.set()
    workers.join()
    st = result.stats
    return {
        "documents": st.documents, "tokens": st.tokens, "workers": args["workers"], "seconds": st.seconds,
        "tokens_per_s": st.tokens / st.seconds,
        "tokens_per_worker_cpu_s": st.tokens / max(st.tokenize_cpu_seconds, 1e-9),
        "documents_per_worker_cpu_s": st.documents / max(st.tokenize_cpu_seconds, 1e-9),
        "parent_tokens_per_cpu_s": st.tokens / max(st.parent_cpu_seconds, 1e-9),
        "parent_peak_mb": vm_hwm_mb(os.getpid()), "parent_before_mb": before,
        "worker_peak_mb": workers.peak_mb, "shards": len(result.manifest.shards),
    }


def vm_hwm_mb(pid: int) -> float:
    """A process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss, which on Linux
    carries over the high-water mark of the process it was forked from, across exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


class _WorkerPeaks(threading.Thread):
    """Polls the VmHWM of this process's children (the tokenizer workers) until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_mb = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in _children(os.getpid()):
                self.peak_mb = max(self.peak_mb, vm_hwm_mb(pid))


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _mixture(tmp: str, cfg: ScaleBenchConfig) -> dict:
    """Stream a 3-source mixture (weights 5:3:2) through one loader."""
    from data_pipeline.loader import Source
    from data_pipeline.prepare import PrepareConfig, prepare

    sources = []
    sizes = (cfg.mixture_docs, cfg.mixture_docs * 2 // 3, cfg.mixture_docs // 2)
    for name, docs, weight in zip("abc", sizes, (5.0, 3.0, 2.0)):
        corpus = write_corpus(os.path.join(tmp, f"mix-{name}"), docs, 400, seed=docs)
        out = os.path.join(tmp, f"mixdata-{name}")
        prepare(PrepareConfig(out=out, sources=[corpus], workers=1), progress_stream=open(os.devnull, "w"))
        sources.append(Source(out, weight, name))
    first, seconds, tokens = stream(sources, cfg)
    return {"sources": 3, "weights": [5, 3, 2], "tokens": tokens, "seconds": seconds, "first_batch_seconds": first,
            "tokens_per_s": tokens / seconds, "seq_len": cfg.seq_len, "n_future": cfg.n_future,
            "micro_batch_size": cfg.micro_batch_size}


def manifest_load(shards: int) -> dict:
    """Cold parse time and size of a `shards`-shard manifest, current form and version 1."""
    from data_pipeline import manifest as mf

    rng = np.random.default_rng(0)
    infos = [mf.ShardInfo(f"train-00007of00064-{i:06d}.tar", "train", 16, 16 << 20, 9000,
                          rng.bytes(32).hex(), 33_564_160, 1 << 20) for i in range(shards)]
    manifest = mf.Manifest(tokenizer={"type": "byte", "vocab_size": 258, "eod_id": 256, "pad_id": 257},
                           dtype="<u2", shards=infos, source={}, seed=0, val_fraction=0.01,
                           shard_tokens=1 << 24, sample_tokens=1 << 20)
    manifest.finalize()
    v1 = {**asdict(manifest), "version": 1}
    v1.pop("parts")
    v1["shards"] = [{**{k: v for k, v in asdict(s).items() if k not in ("tokens", "sample_size")},
                     "sample_tokens": s.sample_tokens} for s in infos]
    with tempfile.TemporaryDirectory(prefix="mtp-bench-manifest-") as tmp:
        out = {"shards": shards}
        for label, text in (("current", manifest.to_json()), ("v1", json.dumps(v1, indent=1))):
            os.makedirs(os.path.join(tmp, label))
            with open(os.path.join(tmp, label, mf.MANIFEST_FILE), "w") as f:
                f.write(text)
            mf._cache.clear()
            start = time.perf_counter()
            loaded = mf.load_manifest(os.path.join(tmp, label))
            out[f"{label}_seconds"] = time.perf_counter() - start
            out[f"{label}_mb"] = len(text) / 1e6
            assert loaded.fingerprint == manifest.fingerprint
            start = time.perf_counter()
            assert mf.load_manifest(os.path.join(tmp, label)) is loaded
            out[f"{label}_again_seconds"] = time.perf_counter() - start
    return out


def report_scale(result: ScaleBenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result), indent=1)
    lines = []
    for p in result.prepare:
        lines.append(
            f"prepare {p['documents']:,} documents ({human(p['tokens'])} tokens, {p['workers']} workers): "
            f"{human(p['tokens_per_worker_cpu_s'])} tokens/s per worker CPU second, packing/writing process "
            f"{human(p['parent_tokens_per_cpu_s'])} tokens per CPU second, {human(p['tokens_per_s'])} tokens/s wall; "
            f"peak memory {p['parent_peak_mb']:.0f} MB (preparing process), {p['worker_peak_mb']:.0f} MB (largest worker)"
        )
    m = result.mixture
    lines.append(f"mixture of {m['sources']} sources (weights 5:3:2): {human(m['tokens_per_s'])} tokens/s "
                 f"({human(m['tokens'])} tokens in {m['seconds']:.2f} s, seq_len {m['seq_len']}, "
                 f"n_future {m['n_future']}, micro-batch {m['micro_batch_size']})")
    f = result.manifest
    lines.append(f"manifest of {f['shards']:,} shards: {f['current_mb']:.1f} MB parsed in {f['current_seconds']:.2f} s "
                 f"(version 1: {f['v1_mb']:.1f} MB in {f['v1_seconds']:.2f} s); again in the same process "
                 f"{f['current_again_seconds'] * 1e3:.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child_prepare(json.loads(sys.argv[1]))))

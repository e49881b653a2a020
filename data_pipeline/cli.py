"""Subcommands of the data pipeline: `mtp prepare`, `mtp data verify|info|merge`, `mtp bench data`.

Heavy imports (torch, tokenizers, webdataset) happen inside the handlers so
`mtp --help` stays fast.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def register(subparsers, bench_subparsers) -> None:
    _register_prepare(subparsers)
    _register_data(subparsers)
    _register_bench(bench_subparsers)


def _add_source_args(parser: argparse.ArgumentParser, workers_help: str) -> None:
    parser.add_argument("--source", nargs="+", default=["stdlib"], metavar="stdlib|PATH",
                        help="stdlib (this Python's standard library .py files), directories, text files, "
                             ".jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
    parser.add_argument("--tokenizer", default="byte", metavar="byte|bpe:N|PATH",
                        help="bytes, byte-level BPE with N ids trained on the corpus, a tokenizer.json, or a "
                             "directory holding one (a Hugging Face model directory, a prepared data set)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=workers_help)


def _register_prepare(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize a corpus into webdataset shards",
                              description="Tokenize documents into webdataset token shards plus manifest.json.")
    _add_source_args(p, "tokenizer processes")
    p.add_argument("--out", required=True, help="output directory (built aside, then renamed into place)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    p.add_argument("--sample-tokens", type=int, default=1 << 20, help="tokens per webdataset sample")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for val")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="file globs for directory sources (default: all)")
    p.add_argument("--text-key", default="text", help="field (JSONL) or column (Parquet) holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (or part)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--part", metavar="I/N",
                   help="prepare only part I of N (0 <= I < N) into the shared --out, e.g. one SLURM array task each; "
                        "the last part to finish writes the manifest (or run `mtp data merge DIR`)")
    p.set_defaults(func=_prepare)


def _register_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect and check prepared data")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="re-check every shard against manifest.json (size, sha256, parse)")
    verify.add_argument("dir", help="prepared data directory or URL prefix")
    verify.add_argument("--workers", type=int, default=2, help="shards checked in parallel")
    verify.set_defaults(func=_verify)
    info = sub.add_parser("info", help="print tokenizer, token and shard counts as JSON; with --config, the mixture plan",
                          description="Counts of one prepared data set (DIR), or the planned proportions and epochs "
                                      "per source of a run config's data.sources for a number of tokens (--config).")
    info.add_argument("dir", nargs="?", help="prepared data directory or URL prefix")
    info.add_argument("--config", help="run config whose data.sources (or data.dir) to plan")
    info.add_argument("--tokens", type=float, help="training tokens to plan for (default: train.max_steps x "
                                                   "global_batch_size x seq_len of the config)")
    info.add_argument("--json", action="store_true", help="the plan as JSON")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for mtp train")
    info.set_defaults(func=_info)
    merge = sub.add_parser("merge", help="write the manifest of a data set prepared in parts (--part I/N)",
                           description="Check that every part of DIR is finished and that all used one tokenizer "
                                       "and the same settings, then write DIR/manifest.json and the tokenizer files.")
    merge.add_argument("dir", help="the --out of the parts")
    merge.set_defaults(func=_merge)


def _register_bench(bench_subparsers) -> None:
    b = bench_subparsers.add_parser("data", help="tokenization and streaming throughput",
                                    description="Prepare a corpus in a temporary directory, then stream it.")
    _add_source_args(b, "tokenizer processes")
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--n-future", type=int, default=4)
    b.add_argument("--micro-batch", type=int, default=8)
    b.add_argument("--stream-tokens", type=int, default=200_000_000, help="input tokens to stream")
    b.add_argument("--loader-workers", type=int, default=1, help="StreamingLoader num_workers (0: no threads)")
    b.add_argument("--synthetic-docs", type=int, nargs="+", metavar="N",
                   help="instead: prepare synthetic corpora of N small documents each (peak memory and rates per N), "
                        "stream a 3-source mixture and parse a --manifest-shards manifest")
    b.add_argument("--doc-bytes", type=int, default=200, help="mean size of a synthetic document")
    b.add_argument("--manifest-shards", type=int, default=100_000, help="shards of the synthetic manifest")
    b.add_argument("--shard-tokens", type=int, default=1 << 22, help="tokens per shard of the synthetic corpora")
    b.add_argument("--mixture-docs", type=int, default=60_000,
                   help="documents (400 bytes) of the heaviest of the 3 mixed sources; the others have 2/3 and 1/2")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_bench)


def _prepare(args) -> int:
    from data_pipeline.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(out=args.out, sources=args.source, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                        sample_tokens=args.sample_tokens, val_fraction=args.val_fraction, workers=args.workers,
                        include=args.include, text_key=args.text_key, overwrite=args.overwrite, seed=args.seed,
                        part=args.part)
    print(prepare(cfg).summary())
    return 0


def _merge(args) -> int:
    from data_pipeline.parts import merge, merge_summary

    print(merge_summary(merge(args.dir), os.path.abspath(args.dir)))
    return 0


def _verify(args) -> int:
    from data_pipeline.verify import verify

    manifest, problems = verify(args.dir, args.workers)
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) in {len(manifest.shards)} shards; "
              "re-copy the named files or re-run mtp prepare --overwrite", file=sys.stderr)
        return 1
    print(f"{args.dir}: all {len(manifest.shards)} shards match the manifest (fingerprint {manifest.fingerprint[:16]})")
    return 0


def _info(args) -> int:
    from data_pipeline.info import dataset_info, mixture_plan, plan_text
    from pretrain.errors import UserError

    if args.config is None:
        if args.dir is None or args.overrides or args.tokens is not None:
            raise UserError("pass a data directory (mtp data info DIR), or --config FILE [--tokens N] for a mixture plan")
        print(json.dumps(asdict(dataset_info(args.dir)), indent=1))
        return 0
    if args.dir is not None:
        args.overrides.insert(0, args.dir)  # argparse gave the first KEY=VALUE to `dir`
    plan = mixture_plan(args.config, args.overrides, args.tokens)
    print(json.dumps(plan, indent=1) if args.json else plan_text(plan))
    return 0


def _bench(args) -> int:
    if args.synthetic_docs:
        from data_pipeline.bench_scale import ScaleBenchConfig, report_scale, run_scale_bench

        cfg = ScaleBenchConfig(synthetic_docs=args.synthetic_docs, workers=args.workers, tokenizer=args.tokenizer,
                               doc_bytes=args.doc_bytes, stream_tokens=args.stream_tokens, seq_len=args.seq_len,
                               n_future=args.n_future, micro_batch_size=args.micro_batch,
                               loader_workers=args.loader_workers, manifest_shards=args.manifest_shards,
                               mixture_docs=args.mixture_docs, shard_tokens=args.shard_tokens)
        print(report_scale(run_scale_bench(cfg), args.json))
        return 0
    from data_pipeline.bench import DataBenchConfig, report, run_data_bench

    cfg = DataBenchConfig(sources=args.source, tokenizer=args.tokenizer, workers=args.workers, seq_len=args.seq_len,
                          n_future=args.n_future, micro_batch_size=args.micro_batch, stream_tokens=args.stream_tokens,
                          loader_workers=args.loader_workers)
    print(report(run_data_bench(cfg), args.json))
    return 0

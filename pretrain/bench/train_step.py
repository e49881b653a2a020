"""`mtp bench train`: optimizer-step time of an n-head model against its n=1 baseline.

Three variants of one config share a process: the next-token baseline
(n_future=1), the MTP model with the same trunk, and the parameter-matched
MTP model (n_future-1 trunk layers removed, as in the paper). Steps are
interleaved round-robin so that a noisy neighbour slows every variant alike;
the ratio of medians is the figure to compare with the paper's Table S5.

Batches are random token ids: step time does not depend on the values, and
the benchmark then needs no prepared data.
"""

import argparse
import dataclasses
import json
import statistics
import time

from pretrain.errors import UserError


def register(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "train", help="step time of n_future=N against n_future=1",
        description="Time full optimizer steps (forward, per-head backward, AdamW) of the config's model "
                    "with n_future=1, with its n_future, and parameter-matched.",
    )
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="run config whose model and batch to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--variants", default="n1,n4,matched",
                   help="which of n1 (baseline), n4 (the config's n_future), matched (parameter-matched) to time, "
                        "comma-separated; one per process keeps a large model within one GPU's memory")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.n_future=4")
    p.set_defaults(func=run)


VARIANT_KEYS = ("n1", "n4", "matched")


def variants(cfg, keys: tuple[str, ...] = VARIANT_KEYS) -> list[tuple[str, object]]:
    """(label, ModelConfig) for the baseline, the MTP model and, when possible, its matched twin."""
    n = cfg.model.n_future
    if n < 2:
        raise UserError("mtp bench train compares against n_future=1: set model.n_future to 2 or more")
    out = {"n1": ("n=1", dataclasses.replace(cfg.model, n_future=1, head_weights=None, match_params=False)),
           "n4": (f"n={n}", dataclasses.replace(cfg.model, match_params=False))}
    matched = dataclasses.replace(cfg.model, match_params=True)
    if matched.trunk_layers >= 1:
        out["matched"] = (f"n={n} matched", matched)
    return [out[k] for k in keys if k in out]


class Subject:
    """One model variant with its own DeepSpeed engine and a fixed random batch, stepped as training steps."""

    def __init__(self, label: str, model_cfg, cfg, runtime):
        import itertools

        import torch

        from parallel.engine import build_engine
        from parallel.steps import EngineSteps
        from pretrain.model.counting import flops_per_token, param_counts
        from pretrain.model.mtp import MTPModel

        self.label = label
        self.runtime = runtime
        run_cfg = dataclasses.replace(cfg, model=model_cfg)
        model = MTPModel(model_cfg, params_dtype=runtime.dtype, device=runtime.device, seed=0,
                         sequence_parallel=cfg.parallel.sequence_parallel)
        self.steps = EngineSteps(run_cfg, runtime, model, build_engine(model, run_cfg, runtime))
        self.params = param_counts(model)["total"]
        self.flops = flops_per_token(model_cfg, cfg.train.seq_len)
        shape = (cfg.train.micro_batch_size, cfg.train.seq_len + model_cfg.n_future)
        tokens = torch.randint(0, model_cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))  # [mb, s + n]
        s = cfg.train.seq_len
        labels = torch.stack([tokens[:, k:k + s] for k in range(1, model_cfg.n_future + 1)], dim=1)  # [mb, n, s]
        self.batches = itertools.repeat({"input_ids": tokens[:, :s], "labels": labels})
        self.times: list[float] = []
        self.peak_bytes = 0

    def step(self, timed: bool) -> None:
        self.runtime.peak_memory_bytes()  # a fresh peak window for this variant's step
        start = time.perf_counter()
        self.steps.train_step(self.batches, step=0)
        self.runtime.synchronize()
        if timed:
            self.times.append(time.perf_counter() - start)
            self.peak_bytes = max(self.peak_bytes, self.runtime.peak_memory_bytes() or 0)


def measure(cfg, steps: int, warmup: int, keys: tuple[str, ...] = VARIANT_KEYS) -> list[dict]:
    from parallel.hardware import peak_flops
    from parallel.runtime import start

    p = cfg.parallel
    runtime = start(p.tp, p.pp, p.dtype, cfg.fault.collective_timeout_s, kernels=cfg.model.kernels,
                    sequence_parallel=p.sequence_parallel)
    subjects = [Subject(label, m, cfg, runtime) for label, m in variants(cfg, keys)]
    for i in range(warmup + steps):
        for subject in subjects:
            subject.step(timed=i >= warmup)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    peak = peak_flops(runtime.device_name(), runtime.dtype_name)
    base = statistics.median(subjects[0].times) if subjects[0].label == "n=1" else None
    rows = []
    for s in subjects:
        seconds = statistics.median(s.times)
        mfu = s.flops * tokens / seconds / (peak * runtime.place.world_size) if peak else None
        rows.append({
            "variant": s.label, "params": s.params, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "time_vs_n1": seconds / base if base else None, "mfu": mfu, "peak_memory_gb": s.peak_bytes / 2**30,
            "device": runtime.device_name(), "dtype": runtime.dtype_name, "kernels": runtime.kernels,
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | params | step (s) | tokens/s | time vs n=1 | MFU | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        ratio = f"{r['time_vs_n1']:.3f}" if r["time_vs_n1"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} "
                     f"| {ratio} | {mfu} | {r['peak_memory_gb']:.2f} GB |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import os

    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.config import load_config, validate

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    keys = tuple(k.strip() for k in args.variants.split(",") if k.strip())
    if not keys or any(k not in VARIANT_KEYS for k in keys):
        raise UserError(f"--variants {args.variants}: give a comma-separated subset of {', '.join(VARIANT_KEYS)}")
    cfg = load_config(args.config, args.overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = _vocab_from_data(cfg, load_tokenizer)
    rows = measure(cfg, args.steps, args.warmup, keys)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank steps; the first reports
        print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


def _vocab_from_data(cfg, load_tokenizer) -> int:
    try:
        from data_pipeline.feed import tokenizer_location

        return load_tokenizer(tokenizer_location(cfg.data)).vocab_size
    except UserError:
        raise UserError(
            f"model.vocab_size is null and no prepared data is at data.dir={cfg.data.dir}; "
            "set model.vocab_size=N or prepare the data first"
        ) from None

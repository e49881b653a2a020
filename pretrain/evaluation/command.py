"""`mtp eval`: check the options, load the model once, run the chosen suites, write and log the results."""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from pretrain.errors import UserError

SUITES = ("loss", "acceptance", "humaneval")


def parse_suites(text: str) -> list[str]:
    suites = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if not suites or unknown:
        raise UserError(f"--suite {text}: choose from {', '.join(SUITES)} (comma-separated, e.g. loss,acceptance)")
    return list(dict.fromkeys(suites))


def parse_speculative(value: str, greedy: bool, device, n_future: int) -> int:
    """Heads for humaneval generation. auto: every head on a GPU for greedy decoding, else plain.

    On a GPU a block of K tokens costs about one token, so drafting pays
    whenever drafts are accepted; on a CPU a speculative forward costs
    about K times a plain one and loses (docs/benchmarks.md). Sampling
    stays plain under auto: speculative sampling preserves the
    distribution but not the samples themselves.
    """
    if value == "auto":
        return n_future if greedy and device.type == "cuda" else 1
    from pretrain.inference.generate_command import parse_speculative as heads_of

    heads = heads_of(value)
    if heads > n_future:
        raise UserError(f"--speculative {value}: this model has {n_future} heads; use 2..{n_future}, off or auto")
    return heads


def _options(args, speculative: int):
    from pretrain.evaluation.humaneval import HumanEvalOptions
    from pretrain.evaluation.sandbox import Limits

    limits = Limits(wall_s=args.timeout, cpu_s=max(1, int(args.timeout / 2)), memory_mb=args.memory_mb)
    return HumanEvalOptions(problems=args.problems, limit=args.limit, samples=args.samples,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, speculative=speculative, workers=args.workers,
                            seed=args.seed, loop_tokens=args.stop_on_loop, limits=limits)


def _check_args(args) -> None:
    checks = [
        (args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1"),
        (args.positions >= 1, f"--positions {args.positions} must be >= 1"),
        (args.windows >= 1, f"--windows {args.windows} must be >= 1"),
        (args.seq_len is None or args.seq_len >= 2, f"--seq-len {args.seq_len} must be >= 2"),
        (args.timeout > 0, f"--timeout {args.timeout} must be > 0 seconds"),
        (args.max_windows is None or args.max_windows >= 1, f"--max-windows {args.max_windows} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run(args) -> int:
    from pretrain.evaluation.source import resolve_source

    suites = parse_suites(args.suite)
    _check_args(args)
    source = resolve_source(args.model)
    out_dir = Path(args.out) if args.out else source.default_out
    data_dir = args.data or source.data_dir
    if "loss" in suites and not data_dir:
        raise UserError("--suite loss needs held-out data: pass --data DIR (a directory written by `mtp prepare`)")
    sandbox = _sandbox(args) if "humaneval" in suites else None  # fail before loading a large model
    from pretrain.inference.loading import load_model, pick_device, quiet_megatron

    with quiet_megatron():
        model, tokenizer, cfg = load_model(source.path, args.dtype)
    seq_len = args.seq_len or min(source.train_seq_len or cfg.max_seq_len, cfg.max_seq_len - cfg.n_future)
    results = {"model": source.path, "step": source.step, "n_future": cfg.n_future, "device": str(pick_device(args.dtype))}
    if "loss" in suites:
        from pretrain.evaluation.loss_suite import evaluate_loss

        results["loss"] = evaluate_loss(model, tokenizer, data_dir, args.split, seq_len, args.batch_size, args.max_windows)
        _say(args, f"loss: {results['loss']['windows']} windows in {results['loss']['seconds']} s")
    if "acceptance" in suites:
        results["acceptance"] = _acceptance(args, model, tokenizer, data_dir, seq_len)
    if "humaneval" in suites:
        results["humaneval"] = _humaneval(args, model, tokenizer, cfg, source, out_dir, sandbox)
    _finish(args, results, source, out_dir)
    return 0


def _sandbox(args):
    from pretrain.evaluation.sandbox import Limits, Sandbox

    return Sandbox(Limits(wall_s=args.timeout, cpu_s=max(1, int(args.timeout / 2)), memory_mb=args.memory_mb))


def _acceptance(args, model, tokenizer, data_dir: str | None, seq_len: int) -> dict:
    import time

    from pretrain.evaluation.acceptance import measure
    from pretrain.evaluation.text import heldout_windows, open_split, split_windows

    start = time.perf_counter()
    if data_dir:
        loader, _ = open_split(data_dir, args.split, tokenizer, seq_len, model.cfg.n_future, args.batch_size)
        windows, text = split_windows(loader, args.windows), f"the {args.split} split of {data_dir}"
    else:
        windows, text = heldout_windows(tokenizer, args.windows, seq_len), "the held-out stdlib files"
    result = asdict(measure(model, windows, args.positions, first=args.min_prefix, batch_size=args.batch_size,
                            seed=args.seed))
    result.update(text=text, windows=len(windows), window_tokens=windows.shape[1],
                  seconds=round(time.perf_counter() - start, 2))
    _say(args, f"acceptance: {result['positions']} prefixes in {result['seconds']} s")
    return result


def _humaneval(args, model, tokenizer, cfg, source, out_dir: Path, sandbox) -> dict:
    from pretrain.evaluation.humaneval import HumanEvalRun
    from pretrain.inference.loading import pick_device

    probe = _options(args, 1)
    heads = parse_speculative(args.speculative, probe.sampling_temperature == 0, pick_device(args.dtype), cfg.n_future)
    run = HumanEvalRun(model, tokenizer, _options(args, heads), out_dir, source.identity, sandbox=sandbox)
    return run.run(log=None if not args.quiet else (lambda line: None))


def _finish(args, results: dict, source, out_dir: Path) -> None:
    from pretrain.evaluation import report

    values = report.metrics(results)
    if not args.no_tracking and (source.tracking_enabled or args.tracking_uri):
        uri = args.tracking_uri or source.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or f"sqlite:///{out_dir.resolve() / 'mlflow.db'}"
        out_dir.mkdir(parents=True, exist_ok=True)
        results["mlflow"] = {"uri": uri, "run_id": report.log_mlflow(values, source, uri, f"eval-{out_dir.name}")}
    report.write(out_dir, results)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(report.markdown(results))
        print(f"results in {out_dir}", file=sys.stderr)


def _say(args, line: str) -> None:
    if not args.quiet:
        print(line, file=sys.stderr, flush=True)

"""`mtp bench speculative`: self-speculative greedy decoding against plain greedy decoding (Table S2).

For every batch size, the same held-out prompts are completed with K = 1
(plain decoding with head 1) and every K to compare. Batches are run
round-robin over K (batch 1 with every K, then batch 2 with every K, ...),
so load from other processes on a shared machine slows all K alike. The
speedup is plain wall-clock time over speculative wall-clock time for the
same prompts, batch size and hardware. Each speculative completion is also
compared token for token with the plain one: greedy speculation must not
change the output.

Beside the measured tokens per forward stands the expected one of the
acceptance suite (`pretrain.evaluation.acceptance`): from the exact
acceptance of each head's draft at `--acceptance-positions` prefixes of
held-out text, with prefix lengths in the range the benchmark decodes at.
Real text has no generation loops, so where the two differ the measured
figure is telling about the model's own completions, not about drafting.
"""

import json
import os
import platform
from dataclasses import asdict, dataclass

from pretrain.errors import UserError


@dataclass
class Row:
    batch_size: int
    heads: int
    seconds: float
    tokens: int
    tokens_per_forward: float
    tokens_per_second: float
    speedup: float
    identical: int  # completions equal to plain decoding's, of `prompts`
    prompts: int
    expected_tokens_per_forward: float | None = None  # from draft acceptance on held-out text


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated integers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text}: give comma-separated integers >= 1, e.g. 1,8")
    return values


def machine_name(device) -> str:
    """The GPU's name, else the CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = f"{torch.get_num_threads()} threads"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return f"{names[0]}, {len(names)} cores, {threads}"
    return f"{platform.processor() or platform.machine()}, {threads}"


def measure(model, rules, prompts: list[list[int]], batch_size: int, heads: list[int]) -> list[Row]:
    """Time every K in `heads` (1 = plain, always measured) on `prompts` in batches of `batch_size`."""
    from pretrain.inference.decode import Decoder, GenerationStats

    ks = sorted(set([1, *heads]))
    decoders = {k: Decoder(model, rules, k) for k in ks}
    stats = {k: GenerationStats() for k in ks}
    outputs: dict[int, list[list[int]]] = {k: [] for k in ks}
    decoders[ks[-1]].generate(prompts[:batch_size])  # warm-up: allocator, kernels, caches
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        for k in ks:
            result = decoders[k].generate(batch)
            stats[k].add(result.stats)
            outputs[k] += [c.tokens for c in result.completions]
    plain = stats[1]
    return [
        Row(batch_size, k, stats[k].seconds, stats[k].tokens, stats[k].tokens_per_forward,
            stats[k].tokens_per_second, plain.seconds / stats[k].seconds,
            sum(a == b for a, b in zip(outputs[k], outputs[1])), len(prompts))
        for k in ks
    ]


def table(rows: list[Row]) -> str:
    lines = []
    for size in sorted({r.batch_size for r in rows}):
        lines += [f"batch size {size}",
                  "| heads used | speedup | tokens/forward | expected tokens/forward (held-out text) | tokens/s "
                  "| identical to plain |", "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.batch_size == size):
            label = "1 (plain)" if r.heads == 1 else str(r.heads)
            expected = "-" if r.expected_tokens_per_forward is None else f"{r.expected_tokens_per_forward:.2f}"
            lines.append(f"| {label} | {r.speedup:.2f} | {r.tokens_per_forward:.2f} | {expected} "
                         f"| {r.tokens_per_second:.1f} | {r.identical}/{r.prompts} |")
        lines.append("")
    return "\n".join(lines)


def expected_tokens_per_forward(model, tokenizer, args) -> dict[int, float]:
    """K -> expected tokens per forward at prefixes of held-out text in prompt-tokens .. prompt + new tokens."""
    from pretrain.evaluation.acceptance import measure
    from pretrain.evaluation.text import heldout_windows

    windows = heldout_windows(tokenizer, args.prompts, args.prompt_tokens + args.new_tokens)
    result = measure(model, windows, args.acceptance_positions, first=args.prompt_tokens)
    return result.expected_tokens_per_forward


def run(args) -> int:
    from pretrain.inference.loading import load_model, pick_device, quiet_megatron
    from pretrain.inference.prompts import benchmark_prompts
    from pretrain.inference.stopping import StopRules

    sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.prompts < 1:
        raise UserError(f"--prompts {args.prompts} must be >= 1")
    if args.acceptance_positions < 1:
        raise UserError(f"--acceptance-positions {args.acceptance_positions} must be >= 1")
    with quiet_megatron():
        model, tokenizer, cfg = load_model(args.model, args.dtype)
    heads = _int_list(args.heads, "--heads") if args.heads else list(range(1, cfg.n_future + 1))
    if max(heads) > cfg.n_future:
        raise UserError(f"--heads {args.heads}: this model has {cfg.n_future} heads; use values 1..{cfg.n_future}")
    if args.prompt_tokens + args.new_tokens > cfg.max_seq_len:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceeds the model's "
                        f"max_seq_len {cfg.max_seq_len}; lower them")
    prompts = benchmark_prompts(tokenizer, args.prompts, args.prompt_tokens)
    device = pick_device(args.dtype)
    rules = StopRules(tokenizer, args.new_tokens)
    rows = [row for size in sizes for row in measure(model, rules, prompts, size, heads)]
    expected = expected_tokens_per_forward(model, tokenizer, args)
    for row in rows:
        row.expected_tokens_per_forward = expected[row.heads]
    setup = {"model": args.model, "n_future": cfg.n_future, "head_type": cfg.head_type, "d_model": cfg.d_model,
             "trunk_layers": cfg.trunk_layers, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
             "new_tokens": args.new_tokens, "acceptance_positions": args.acceptance_positions,
             "device": str(device), "dtype": args.dtype,
             "machine": machine_name(device)}
    if args.json:
        print(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(" ".join(f"{k}={v}" for k, v in setup.items()))
        print(table(rows))
    return 0

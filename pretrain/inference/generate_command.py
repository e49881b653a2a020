"""`mtp generate`: read prompts, decode them in batches, print completions (and stats on stderr)."""

import json
import sys
from collections import Counter
from pathlib import Path

from pretrain.errors import UserError
from pretrain.inference.sampling import Sampling


def parse_speculative(value: str) -> int:
    """`--speculative` value -> number of heads used; `off` is 1 (head 1 alone, plain decoding)."""
    if value == "off":
        return 1
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--speculative {value}: give a number of heads K >= 2 (at most the model's n_future) or off")
    return int(value)


def read_prompts(args, tokenizer, max_seq_len: int) -> list[str]:
    """The prompt texts named by --prompt, --prompt-file or --heldout-function."""
    if args.prompt:
        return list(args.prompt)
    if args.heldout_function is not None:
        from pretrain.inference.prompts import heldout_function_prompt

        room = max_seq_len - args.max_new_tokens
        if room < 1:
            raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                            f"model's max_seq_len {max_seq_len}; lower it")
        return [heldout_function_prompt(args.heldout_function, tokenizer, room)]
    return _prompt_file(args.prompt_file)


def _prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompt-file {path} not found; pass a text or .jsonl file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--prompt-file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if file.suffix != ".jsonl":
        return [text]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err}); write one JSON string per line") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise UserError(f"{path}:{number}: expected a JSON string or an object with a string \"prompt\"")
        prompts.append(prompt)
    return prompts


def format_stats(heads: int, stats) -> str:
    mode = f"speculative K={heads}" if heads > 1 else "plain"
    drafts = f", drafts accepted {stats.accepted_drafts}/{stats.proposed_drafts}" if heads > 1 else ""
    return (f"{mode}: {stats.tokens} tokens in {stats.forwards} forwards = {stats.tokens_per_forward:.2f} "
            f"tokens/forward{drafts}; {stats.tokens_per_second:.1f} tokens/s ({stats.seconds:.2f} s)")


def run(args) -> int:
    from pretrain.inference.loading import quiet_megatron

    sampling = Sampling(args.temperature, args.top_p)
    heads = parse_speculative(args.speculative)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    with quiet_megatron():
        from pretrain.inference.decode import Decoder, GenerationStats
        from pretrain.inference.loading import load_model
        from pretrain.inference.stopping import StopRules

        model, tokenizer, cfg = load_model(args.model, args.dtype)
    rules = StopRules(tokenizer, args.max_new_tokens, tuple(args.stop), args.stop_on_loop)
    decoder = Decoder(model, rules, heads, sampling, args.seed)
    texts = read_prompts(args, tokenizer, cfg.max_seq_len)
    total = GenerationStats()
    reasons: Counter[str] = Counter()
    for first in range(0, len(texts), args.batch_size):
        batch = texts[first : first + args.batch_size]
        result = decoder.generate([tokenizer.encode(t) for t in batch])
        for i, completion in enumerate(result.completions, start=first):
            if len(texts) > 1:
                print(f"=== completion {i + 1} ({completion.finish_reason}) ===")
            print(texts[i] + completion.text if args.echo else completion.text)
        total.add(result.stats)
        reasons.update(c.finish_reason for c in result.completions)
    if args.stats:
        ended = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
        print(f"{format_stats(heads, total)}; ended by {ended}", file=sys.stderr)
    return 0

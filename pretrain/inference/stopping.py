"""When a completion ends: after max new tokens, at the end-of-document token, at a stop string, or in a loop.

Speculative decoding emits several tokens per forward, possibly past the
point where a sequence should have stopped. The rules therefore consume
tokens one at a time and drop everything after the stop, so a completion
is the same token for token whether it was decoded plainly or with drafts.

A loop (`loop_tokens` > 0) is a tail of that many tokens that repeats a
pattern of at most `MAX_LOOP_PERIOD` tokens: a run of spaces, `____`,
`the the the`. Weak models fall into such runs under greedy decoding, and
every draft of a run is accepted, so without this rule a loop both wastes
the budget and inflates tokens per forward.
"""

from dataclasses import dataclass, field

from pretrain.errors import UserError

MAX_LOOP_PERIOD = 8  # tokens


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-document token excluded
    consumed: int = 0  # generated ids including a final end-of-document token
    forwards: int = 0  # model forwards this completion took part in while running, the prefill included
    finish_reason: str | None = None  # "length", "eod", "stop" or "loop" once finished
    text: str = ""  # set by `StopRules.finish`: decoded, cut before the first stop string

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class StopRules:
    """max_new_tokens, the tokenizer's end-of-document id, optional stop strings and loop length."""

    def __init__(self, tokenizer, max_new_tokens: int, stop_strings: tuple[str, ...] = (), loop_tokens: int = 0):
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} must be >= 1")
        if loop_tokens != 0 and loop_tokens <= MAX_LOOP_PERIOD:
            raise UserError(f"--stop-on-loop {loop_tokens} must be 0 (off) or more than {MAX_LOOP_PERIOD} tokens")
        self.loop_tokens = loop_tokens
        if any(not s for s in stop_strings):
            raise UserError("--stop strings must not be empty")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings)
        # Enough trailing tokens to hold any stop string even if some tokens decode to
        # partial characters (a byte tokenizer needs up to 4 per character).
        self.window = 4 * max((len(s) for s in self.stop_strings), default=0) + 8

    def start(self) -> Completion:
        return Completion()

    def extend(self, completion: Completion, tokens: list[int]) -> int:
        """Append `tokens` until the completion stops; returns how many were consumed."""
        before = completion.consumed
        for token in tokens:
            if completion.done:
                break
            completion.consumed += 1
            if token == self.tokenizer.eod_id:
                completion.finish_reason = "eod"
                break
            completion.tokens.append(token)
            if self._hits_stop_string(completion.tokens):
                completion.finish_reason = "stop"
            elif self._loops(completion.tokens):
                completion.finish_reason = "loop"
            elif completion.consumed >= self.max_new_tokens:
                completion.finish_reason = "length"
        return completion.consumed - before

    def finish(self, completion: Completion) -> Completion:
        """Decode the completion's text, cut before the first stop string it contains."""
        text = self.tokenizer.decode(completion.tokens)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        completion.text = text[: min(cuts)] if cuts else text
        return completion

    def _loops(self, tokens: list[int]) -> bool:
        """The last `loop_tokens` tokens repeat a pattern of at most MAX_LOOP_PERIOD tokens."""
        if not self.loop_tokens or len(tokens) < self.loop_tokens:
            return False
        tail = tokens[-self.loop_tokens :]
        return any(tail[p:] == tail[:-p] for p in range(1, MAX_LOOP_PERIOD + 1))

    def _hits_stop_string(self, tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :])
        return any(s in tail for s in self.stop_strings)

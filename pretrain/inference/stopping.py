"""When a completion ends: after max new tokens, at the end-of-document token, or at a stop string.

Speculative decoding emits several tokens per forward, possibly past the
point where a sequence should have stopped. The rules therefore consume
tokens one at a time and drop everything after the stop, so a completion
is the same token for token whether it was decoded plainly or with drafts.
"""

from dataclasses import dataclass, field

from pretrain.errors import UserError


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-document token excluded
    consumed: int = 0  # generated ids including a final end-of-document token
    forwards: int = 0  # model forwards this completion took part in while running, the prefill included
    finish_reason: str | None = None  # "length", "eod" or "stop" once finished
    text: str = ""  # set by `StopRules.finish`: decoded, cut before the first stop string

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class StopRules:
    """max_new_tokens, the tokenizer's end-of-document id, and optional stop strings."""

    def __init__(self, tokenizer, max_new_tokens: int, stop_strings: tuple[str, ...] = ()):
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} must be >= 1")
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
            elif completion.consumed >= self.max_new_tokens:
                completion.finish_reason = "length"
        return completion.consumed - before

    def finish(self, completion: Completion) -> Completion:
        """Decode the completion's text, cut before the first stop string it contains."""
        text = self.tokenizer.decode(completion.tokens)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        completion.text = text[: min(cuts)] if cuts else text
        return completion

    def _hits_stop_string(self, tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :])
        return any(s in tail for s in self.stop_strings)

"""Progress lines for long jobs: one rewritten line on a terminal, plain lines in logs."""

import sys
import time


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class Progress:
    """Reports documents and tokens done; at most every `every` seconds (30 s when not a TTY), and once at the end.

    The corpus is streamed, so there is no total to count down from.
    """

    def __init__(self, label: str, stream=None, every: float | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 30.0)
        self.start = time.perf_counter()
        self.last = self.start
        self.docs = self.tokens = 0

    def update(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = docs, tokens
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(end="")

    def close(self) -> None:
        self._print(end="\n" if self.tty else "")

    def _print(self, end: str) -> None:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.label}: {self.docs} documents, {human(self.tokens)} tokens, {human(rate)} tokens/s"
        self.stream.write(("\r" + line + end) if self.tty else line + "\n")
        self.stream.flush()

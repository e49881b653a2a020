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
    """Reports documents and tokens done; at most every `every` seconds (30 s when not a TTY)."""

    def __init__(self, label: str, total_docs: int, stream=None, every: float | None = None):
        self.label = label
        self.total = total_docs
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 30.0)
        self.start = time.perf_counter()
        self.last = self.start
        self.printed_tty_line = False

    def update(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and docs < self.total:
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        line = f"{self.label}: {docs}/{self.total} documents, {human(tokens)} tokens, {human(rate)} tokens/s"
        if self.tty:
            self.stream.write("\r" + line)
            self.printed_tty_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.printed_tty_line:
            self.stream.write("\n")
            self.stream.flush()

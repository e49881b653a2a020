"""The decoding loop: prefill, then draft-and-verify forwards until every sequence has stopped.

With `heads = K`, every forward after the prefill feeds each sequence a
block of K tokens: the token head 1 chose last, then the K - 1 drafts heads
2..K made at the same position. Head 1's outputs over the block verify the
drafts (`sampling.verify`); the kept drafts and head 1's added token are
emitted, the cache keeps the positions of the block's first token and the
kept drafts, and heads 2..K draft again from the last kept position, whose
trunk state this very forward computed. `heads = 1` is plain decoding with
head 1 and runs through the same code with empty drafts.

Batches: prompts of different lengths are right-padded for the prefill and
each sequence's cache length starts at its own prompt length, so the
padding is never attended and positions need no shift (see `kv_cache`).
Sequences that stop early keep riding along with nothing committed.
"""

import time
from dataclasses import dataclass, field, fields

import torch

from pretrain.errors import UserError
from pretrain.inference.forward import cached_logits
from pretrain.inference.kv_cache import kv_cached
from pretrain.inference.sampling import Sampling, draft, pick, verify
from pretrain.inference.stopping import Completion, StopRules


@dataclass
class GenerationStats:
    """What a `generate` call cost: forwards per sequence while it was running, and wall-clock time."""

    tokens: int = 0  # emitted tokens, all sequences (stop tokens included)
    forwards: int = 0  # sum over sequences of the forwards it took part in while running
    model_calls: int = 0  # batched forwards, the prefill included
    seconds: float = 0.0
    accepted_drafts: int = 0
    proposed_drafts: int = 0

    def add(self, other: "GenerationStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Generation:
    completions: list[Completion]
    stats: GenerationStats = field(default_factory=GenerationStats)


class Decoder:
    """Greedy or sampled decoding with head 1, drafted by heads 2..`heads` when `heads` > 1."""

    def __init__(self, model, rules: StopRules, heads: int = 1, sampling: Sampling = Sampling(), seed: int = 0):  # noqa: B008 (frozen)
        n_future = model.cfg.n_future
        if not 1 <= heads <= n_future:
            raise UserError(f"--speculative {heads}: this model has {n_future} heads; use 2..{n_future} or off")
        self.model = model
        self.rules = rules
        self.heads = heads
        self.sampling = sampling
        self.device = next(model.parameters()).device
        # One stream for the decoder's lifetime: successive batches draw different samples.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def generate(self, prompts: list[list[int]]) -> Generation:
        """Complete every prompt (lists of token ids); returns completions in prompt order and stats."""
        self._check(prompts)
        completions = [self.rules.start() for _ in prompts]
        stats = GenerationStats()
        start = time.perf_counter()
        max_len = max(map(len, prompts)) + self.rules.max_new_tokens + self.heads
        with torch.inference_mode(), kv_cached(self.model, self.heads, len(prompts), max_len) as state:
            logits = self._prefill(state, prompts)  # [b, n_heads, V] at each prompt's last token
            token = pick(logits[:, 0], self.sampling, self.generator)  # [b]
            self._emit(completions, [[t] for t in token.tolist()], stats)
            drafts, draft_probs = draft(logits[:, 1:], self.sampling, self.generator)  # [b, K - 1]
            while not all(c.done for c in completions):
                token, drafts, draft_probs = self._step(state, token, drafts, draft_probs, completions, stats)
        stats.seconds = time.perf_counter() - start
        return Generation([self.rules.finish(c) for c in completions], stats)

    def _check(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise UserError("no prompts given; pass --prompt TEXT or --prompt-file FILE")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"prompt {i + 1} is empty; every prompt needs at least one token")
        longest = max(map(len, prompts))
        limit = self.model.cfg.max_seq_len
        if longest + self.rules.max_new_tokens > limit:
            raise UserError(
                f"a prompt of {longest} tokens plus --max-new-tokens {self.rules.max_new_tokens} exceeds the "
                f"model's max_seq_len {limit} (positions it never trained on); shorten the prompt or lower "
                "--max-new-tokens"
            )

    def _prefill(self, state, prompts: list[list[int]]) -> torch.Tensor:
        """Cache every prompt; returns all used heads' logits at each prompt's last token [b, K, V]."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # [b]
        ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)  # [b, P]
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt, device=self.device)
        logits = cached_logits(self.model, state, ids, self.heads, only=lengths - 1)  # [b, 1, K, V]
        state.commit(lengths)
        return logits[:, 0]  # [b, K, V]

    def _step(self, state, token, drafts, draft_probs, completions, stats):
        """One verifying forward of the block [token, drafts]; returns the next token, drafts and their probs."""
        block = torch.cat([token[:, None], drafts], dim=1)  # [b, K]
        logits = cached_logits(self.model, state, block, self.heads)  # [b, K, K, V]
        kept, added = verify(drafts, draft_probs, logits[:, :, 0], self.sampling, self.generator)  # [b], [b]
        kept_list = kept.tolist()
        running = [not c.done for c in completions]
        stats.accepted_drafts += sum(k for k, r in zip(kept_list, running) if r)
        stats.proposed_drafts += drafts.shape[1] * sum(running)
        emitted = [d[:k] + [a] for d, k, a in zip(drafts.tolist(), kept_list, added.tolist())]
        self._emit(completions, emitted, stats)
        # Positions of the block's first token and the kept drafts stay cached; a sequence that
        # has stopped keeps nothing more, so its later forwards stay inside the cache.
        still_running = torch.tensor([not c.done for c in completions], device=self.device)  # [b]
        state.commit(torch.where(still_running, kept + 1, 0))
        rows = torch.arange(block.shape[0], device=self.device)
        next_drafts, next_probs = draft(logits[rows, kept, 1:], self.sampling, self.generator)  # [b, K - 1]
        return added, next_drafts, next_probs

    def _emit(self, completions: list[Completion], emitted: list[list[int]], stats: GenerationStats) -> None:
        """Hand each running sequence its new tokens; counts one forward per running sequence."""
        stats.model_calls += 1
        for completion, tokens in zip(completions, emitted):
            if completion.done:
                continue
            completion.forwards += 1
            stats.forwards += 1
            stats.tokens += self.rules.extend(completion, tokens)

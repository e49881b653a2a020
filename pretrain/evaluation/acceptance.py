"""Draft acceptance of greedy self-speculative decoding, computed exactly on held-out text without generating.

At a prefix x_1..x_m of real text (the true prefix, not the model's own
output), one decoding round goes exactly as `inference.decode` does it:

1. the trunk state at position m gives head 1's greedy token y = x'_{m+1}
   and heads 2..n their greedy drafts d_2..d_n of the tokens after it;
2. the verifying forward reads the block [y, d_2, ..., d_n] after the
   prefix; head 1's greedy prediction at block position j is g_j;
3. draft d_k is kept iff d_k == g_{k-2} and every earlier draft was kept.

With L the number of leading kept drafts, a round of greedy decoding with
heads 1..K emits min(L, K - 1) + 1 tokens, so the expected tokens per
forward is E[min(L, K - 1)] + 1 = 1 + sum_{k=2..K} P(L >= k - 1). One
block of all n heads serves every K: head 1 is causal, so its prediction
at block position j depends only on the block's first j + 1 tokens, and
heads k <= K draft the same tokens whatever K is.

The computation uses the KV-cache decoder: every window is prefilled
once (all heads' greedy guesses at the sampled positions come out of that
one forward), then the sampled prefix lengths are verified from the
longest to the shortest, each by rolling the cache back to the prefix
length (`CacheState.seek`) and running head 1 over the block. A block
only overwrites cache positions at or after its own prefix length, which
later (shorter) prefixes never read.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from pretrain.inference.forward import cached_logits
from pretrain.inference.kv_cache import kv_cached


@dataclass
class Acceptance:
    """Per draft head k = 2..n and per K = 1..n; rates are fractions of the sampled positions."""

    n_future: int
    positions: int
    match_rate: dict[int, float] = field(default_factory=dict)  # k -> P(d_k == g_{k-2}), whatever came before
    kept_rate: dict[int, float] = field(default_factory=dict)  # k -> P(d_2..d_k all kept) = P(L >= k - 1)
    expected_tokens_per_forward: dict[int, float] = field(default_factory=dict)  # K -> 1 + sum_{k<=K} kept_rate
    accepted_histogram: list[int] = field(default_factory=list)  # positions with L = 0, 1, ..., n - 1

    @property
    def conditional_rate(self) -> dict[int, float]:
        """k -> P(d_k kept | d_2..d_{k-1} kept): how each head does when it gets its turn."""
        rates, before = {}, 1.0
        for k, kept in self.kept_rate.items():
            rates[k] = kept / before if before > 0 else 0.0
            before = kept
        return rates


def draft_matches(model, windows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Whether each draft is what head 1 predicts after y and the drafts before it.

    windows [B, W] token ids of real text; positions [B, P] prefix lengths in
    1..W -> matches [B, P, n - 1] (bool; draft k is column k - 2). Kept
    drafts are the leading True values of each row (`accepted_drafts`).
    """
    n = model.cfg.n_future
    batch, width = windows.shape
    device = next(model.parameters()).device
    windows, positions = windows.to(device), positions.to(device)
    rows = torch.arange(batch, device=device)
    matches = torch.zeros(*positions.shape, n - 1, dtype=torch.bool, device=device)  # [B, P, n - 1]
    with torch.inference_mode(), kv_cached(model, n, batch, width + n) as state:
        guesses = cached_logits(model, state, windows, n, only=positions - 1).argmax(dim=-1)  # [B, P, n]
        order = positions.argsort(dim=1, descending=True)  # [B, P] longest prefix first
        for j in range(positions.shape[1]):
            column = order[:, j]  # [B]
            block = guesses[rows, column]  # [B, n] = [y, d_2, ..., d_n]
            state.seek(positions[rows, column])
            verified = cached_logits(model, state, block, 1)[:, :, 0].argmax(dim=-1)  # [B, n] g_0..g_{n-1}
            matches[rows, column] = block[:, 1:] == verified[:, :-1]
    return matches.cpu()


def accepted_drafts(matches: torch.Tensor) -> torch.Tensor:
    """matches [..., n - 1] -> L [...], the number of leading kept drafts."""
    return matches.long().cumprod(dim=-1).sum(dim=-1)


def sample_positions(count: int, per_window: int, first: int, last: int, seed: int) -> torch.Tensor:
    """[count, per_window] distinct prefix lengths in first..last for each window, seeded by (seed, window)."""
    span = last - first + 1
    take = min(per_window, span)
    rows = [np.random.default_rng([seed, i]).choice(span, size=take, replace=False) + first for i in range(count)]
    return torch.from_numpy(np.stack(rows)).long()


def measure(model, windows: torch.Tensor, per_window: int, first: int = 1, batch_size: int = 8,
            seed: int = 0) -> Acceptance:
    """Acceptance over `per_window` sampled prefix lengths in first..W of every window [N, W]."""
    n = model.cfg.n_future
    width = windows.shape[1]
    positions = sample_positions(len(windows), per_window, max(1, first), width, seed)  # [N, P]
    if n == 1:  # nothing drafts: every forward emits one token
        return Acceptance(1, positions.numel(), expected_tokens_per_forward={1: 1.0},
                          accepted_histogram=[positions.numel()])
    parts = [draft_matches(model, windows[i : i + batch_size], positions[i : i + batch_size])
             for i in range(0, len(windows), batch_size)]
    return summarize(torch.cat(parts).reshape(-1, n - 1), n)


def summarize(matches: torch.Tensor, n: int) -> Acceptance:
    """matches [positions, n - 1] -> the per-head and per-K figures."""
    kept = accepted_drafts(matches)  # [positions]
    result = Acceptance(n, len(matches))
    result.accepted_histogram = torch.bincount(kept, minlength=n).tolist()
    tokens = 1.0
    result.expected_tokens_per_forward[1] = tokens
    for k in range(2, n + 1):
        result.match_rate[k] = float(matches[:, k - 2].float().mean())
        result.kept_rate[k] = float((kept >= k - 1).float().mean())
        tokens += result.kept_rate[k]
        result.expected_tokens_per_forward[k] = tokens
    return result

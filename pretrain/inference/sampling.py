"""Choosing tokens and verifying drafts: greedy matching and speculative rejection sampling.

Verification takes the drafted tokens d_1..d_m of every sequence and head
1's distributions p_0..p_m at the m+1 positions of the verifying forward
(p_j is the target for the token after position j, i.e. for d_{j+1}). It
returns how many drafts each sequence keeps and the one token head 1 adds
after them, so every forward yields between 1 and m + 1 tokens.

- Greedy: d_{j+1} is kept while it equals argmax p_j; the added token is
  argmax p_a. The result is exactly greedy decoding with head 1.
- Sampling (Leviathan et al. 2023, Chen et al. 2023): d_{j+1} was drawn
  from the draft distribution q_{j+1} (a later head's); it is kept with
  probability min(1, p_j(d) / q_{j+1}(d)); at the first rejection the added
  token is drawn from normalize(max(0, p_j - q_{j+1})), and if all are kept
  from p_m. Every emitted token is then distributed exactly as plain
  sampling from head 1 would distribute it.
"""

from dataclasses import dataclass

import torch

from pretrain.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_p keeps the smallest set of tokens holding that much mass."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:  # also rejects NaN
            raise UserError(f"--temperature {self.temperature} must be >= 0 (0 = greedy), e.g. 0.8")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1], e.g. 0.95")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] -> the distribution sampling draws from [..., V] (float32 or wider)."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits.to(dtype) / self.temperature, dim=-1)  # [..., V]
        if self.top_p >= 1.0:
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [..., V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        kept = torch.where(mass_before < self.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        filtered = torch.zeros_like(probs).scatter(-1, order, kept)  # [..., V]
        return filtered / filtered.sum(dim=-1, keepdim=True)


def _leading_true(matches: torch.Tensor) -> torch.Tensor:
    """[b, m] bool -> [b] number of leading True values."""
    return matches.long().cumprod(dim=1).sum(dim=1)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [b, V] -> one token per row [b]."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def verify_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [b, m], head 1's logits [b, m + 1, V] -> (kept drafts [b], added token [b])."""
    best = target_logits.argmax(dim=-1)  # [b, m + 1]
    kept = _leading_true(drafts == best[:, :-1])  # [b]
    return kept, best.gather(1, kept[:, None])[:, 0]


def verify_sampled(
    drafts: torch.Tensor,  # [b, m]
    draft_probs: torch.Tensor,  # [b, m, V] the distributions the drafts were drawn from
    target_probs: torch.Tensor,  # [b, m + 1, V] head 1's, after temperature and top-p
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling -> (kept drafts [b], added token [b])."""
    b, m = drafts.shape
    p_draft = target_probs[:, :m].gather(2, drafts[:, :, None])[:, :, 0]  # [b, m]
    q_draft = draft_probs.gather(2, drafts[:, :, None])[:, :, 0]  # [b, m]
    coins = torch.rand(b, m, generator=generator, device=drafts.device, dtype=p_draft.dtype)  # [b, m]
    kept = _leading_true(coins * q_draft < p_draft)  # [b]; accepts with probability min(1, p / q)
    rows = torch.arange(b, device=drafts.device)
    target = target_probs[rows, kept]  # [b, V] head 1 after the kept drafts
    padded_q = torch.cat([draft_probs, torch.zeros_like(target[:, None])], dim=1)  # [b, m + 1, V]
    residual = (target - padded_q[rows, kept]).clamp(min=0.0)  # [b, V]; equals target when all were kept
    mass = residual.sum(dim=-1, keepdim=True)  # [b, 1]
    # A rejection implies p(d) < q(d), so the residual has mass; guard rounding to zero all the same.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
    return kept, _sample(residual, generator)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Head 1's token from its logits [b, V] with no drafts to verify (after the prefill) [b]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return _sample(sampling.probabilities(logits), generator)


def draft(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None):
    """The later heads' logits [b, m, V] -> (drafts [b, m], their distributions [b, m, V], None when greedy)."""
    if sampling.greedy:
        return logits.argmax(dim=-1), None
    probs = sampling.probabilities(logits)  # [b, m, V]
    b, m, v = probs.shape
    if m == 0:  # plain decoding: nothing to draft
        return torch.zeros(b, 0, dtype=torch.long, device=logits.device), probs
    return _sample(probs.reshape(b * m, v), generator).reshape(b, m), probs


def verify(
    drafts: torch.Tensor,  # [b, m]
    draft_probs: torch.Tensor | None,  # [b, m, V] from `draft`, None when greedy
    target_logits: torch.Tensor,  # [b, m + 1, V] head 1's
    sampling: Sampling,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept drafts [b], the token head 1 adds after them [b]) under `sampling`."""
    if sampling.greedy:
        return verify_greedy(drafts, target_logits)
    return verify_sampled(drafts, draft_probs, sampling.probabilities(target_logits), generator)

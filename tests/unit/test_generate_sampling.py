"""Speculative sampling draws the first generated tokens from exactly head 1's distribution.

A tiny model over an 8-symbol vocabulary makes the exact joint
distribution of the first three generated tokens enumerable (8^3
sequences, end of document ending a sequence early), computed with the
training forward and no cache. Thousands of speculative samples are then
tested against it with a chi-square test whose false-failure probability
is 1e-6 (the seeds are fixed, so a pass is reproducible). A control run
whose verification wrongly accepts every draft must fail the same test:
the test can tell a wrong sampler from a right one.
"""

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chi2  # scipy comes with mlflow

from data_pipeline.tokenizer import hf_from_json
from pretrain.inference import sampling as sampling_module
from pretrain.inference.decode import Decoder
from pretrain.inference.sampling import Sampling
from pretrain.inference.stopping import StopRules
from pretrain.model.config import ModelConfig
from pretrain.model.mtp import MTPModel

SYMBOLS = ["a", "b", "c", "d", "e", "f"]
NEW_TOKENS = 3
SAMPLES = 6000
FALSE_FAILURE = 1e-6


def small_tokenizer():
    """A real `tokenizers` word-level tokenizer of 6 symbols + end-of-document + padding (vocab 8)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(["<|eod|>", "<|pad|>"])
    return hf_from_json(core.to_str(), "test vocabulary")


TOKENIZER = small_tokenizer()
PROMPT = TOKENIZER.encode("a c b")


@pytest.fixture(scope="module")
def model() -> MTPModel:
    """Random weights with a large init: peaked, different distributions per head, so drafts are often wrong."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=4, n_future=3,
                      init_std=0.4, max_seq_len=32)
    return MTPModel(cfg, params_dtype=torch.float64).eval()


def exact_distribution(model, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(first NEW_TOKENS generated tokens) under plain sampling from head 1; eod ends a sequence."""
    eod = TOKENIZER.eod_id
    probs: dict[tuple[int, ...], float] = {}
    with torch.no_grad():
        for continuation in itertools.product(range(TOKENIZER.vocab_size), repeat=NEW_TOKENS - 1):
            ids = torch.tensor([PROMPT + list(continuation)], device=next(model.parameters()).device)  # [1, s]
            p = sampling.probabilities(model.head_logits(ids)[0, len(PROMPT) - 1 :, 0]).cpu()  # [NEW_TOKENS, V]
            for last in range(TOKENIZER.vocab_size):
                outcome = (*continuation, last)
                cut = outcome.index(eod) + 1 if eod in outcome else NEW_TOKENS
                prefix = outcome[:cut]
                if prefix in probs and cut < NEW_TOKENS:
                    continue  # an early eod: counted once, not once per ignored tail
                probs[prefix] = float(torch.prod(p[torch.arange(cut), torch.tensor(prefix)]))
    return probs


def speculative_samples(model, sampling: Sampling) -> tuple[Counter, object]:
    decoder = Decoder(model, StopRules(TOKENIZER, NEW_TOKENS), heads=3, sampling=sampling, seed=11)
    counts: Counter = Counter()
    batch = 1000
    for _ in range(SAMPLES // batch):
        result = decoder.generate([PROMPT] * batch)
        for completion in result.completions:
            eod = [TOKENIZER.eod_id] if completion.finish_reason == "eod" else []
            counts[tuple(completion.tokens + eod)] += 1
    return counts, result.stats


def chi_square(counts: Counter, probs: dict) -> tuple[float, float]:
    """(statistic, critical value at FALSE_FAILURE); cells expecting < 5 samples are pooled into one."""
    total = sum(counts.values())
    assert set(counts) <= set(probs), f"impossible outcomes sampled: {set(counts) - set(probs)}"
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for outcome, p in probs.items():
        expected, observed = total * p, counts.get(outcome, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, float(chi2.ppf(1 - FALSE_FAILURE, cells - 1))


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_p=0.8)], ids=["t1", "t0.7-p0.8"])
def test_speculative_sampling_matches_head_one(model, sampling):
    counts, stats = speculative_samples(model, sampling)
    assert 0 < stats.accepted_drafts < stats.proposed_drafts, stats  # both branches of verification ran
    stat, critical = chi_square(counts, exact_distribution(model, sampling))
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


def test_accepting_every_draft_fails_the_same_test(model, monkeypatch):
    def accept_all(drafts, draft_probs, target_probs, generator):
        kept = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long, device=drafts.device)
        return kept, torch.multinomial(target_probs[:, -1], 1, generator=generator)[:, 0]

    monkeypatch.setattr(sampling_module, "verify_sampled", accept_all)
    sampling = Sampling(1.0)
    counts, _ = speculative_samples(model, sampling)
    stat, critical = chi_square(counts, exact_distribution(model, sampling))
    assert stat > critical


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    probs = Sampling(1.0, top_p=0.7).probabilities(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log())
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = Sampling(1.0, top_p=0.5).probabilities(torch.tensor([[0.5, 0.3, 0.2]]).log())
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0]]))

"""Draft acceptance: exact agreement with real speculative decoding, and the two constructed extremes.

Float64 models (as in test_generate.py), so the batched verifying forward
and the decoder's forwards cannot round an argmax differently.
"""

import pytest
import torch

from pretrain.evaluation.acceptance import accepted_drafts, draft_matches, measure, summarize
from pretrain.inference.decode import Decoder
from pretrain.inference.stopping import StopRules
from tests.unit.test_generate import TEXT, TOKENIZER, random_model, train_on_text

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """Overfitted to a periodic text: its heads draft well but not always (n = 4)."""
    return train_on_text(random_model("transformer", init_std=0.02), steps=40)


def walk(kept: dict[int, int], prompt_len: int, consumed: int, k: int) -> tuple[int, int]:
    """Forwards and accepted drafts greedy decoding with K heads needs, from the acceptance at each prefix.

    The prefill emits one token; a round at prefix length m emits
    min(L(m), K - 1) + 1 tokens and moves to prefix length m + that.
    """
    forwards, emitted, accepted, m = 1, 1, 0, prompt_len
    while emitted < consumed:
        a = min(kept[m], k - 1)
        forwards, emitted, accepted, m = forwards + 1, emitted + a + 1, accepted + a, m + a + 1
    return forwards, accepted


@pytest.mark.parametrize("prompt", ["x3 = y[", "def f(x):\n", "x0 = y[0] + 0\nx1"])
def test_acceptance_at_every_prefix_replays_real_speculative_decoding_exactly(trained, prompt):
    ids = TOKENIZER.encode(prompt)
    plain = Decoder(trained, StopRules(TOKENIZER, NEW_TOKENS), heads=1).generate([ids]).completions[0]
    text = ids + plain.tokens  # the greedy continuation is the "true" text here
    prefixes = torch.arange(len(ids), len(text) + 1)[None]  # [1, P] every prefix decoding can visit
    matches = draft_matches(trained, torch.tensor([text]), prefixes)[0]  # [P, n - 1]
    kept = dict(zip(prefixes[0].tolist(), accepted_drafts(matches).tolist()))
    total_accepted = 0
    for k in range(2, trained.cfg.n_future + 1):
        result = Decoder(trained, StopRules(TOKENIZER, NEW_TOKENS), heads=k).generate([ids])
        assert result.completions[0].tokens == plain.tokens
        forwards, accepted = walk(kept, len(ids), plain.consumed, k)
        assert (result.stats.forwards, result.stats.accepted_drafts) == (forwards, accepted)
        total_accepted += accepted
    assert total_accepted > 0  # the check compared real acceptances, not only rejections


def test_expected_tokens_per_forward_is_close_to_measured_on_the_models_own_text(trained):
    """Averaged over prefixes of its own greedy text, the figure predicts measured tokens per forward."""
    prompts = [TOKENIZER.encode(p) for p in ("x1 = y[", "x4 = y[2] + ", "x6 = ")]
    plain = Decoder(trained, StopRules(TOKENIZER, NEW_TOKENS), heads=1).generate(prompts)
    spec = Decoder(trained, StopRules(TOKENIZER, NEW_TOKENS), heads=4).generate(prompts)
    width = min(len(p) + len(c.tokens) for p, c in zip(prompts, plain.completions))
    windows = torch.tensor([(p + c.tokens)[:width] for p, c in zip(prompts, plain.completions)])
    expected = measure(trained, windows, per_window=width, first=max(map(len, prompts)))
    assert abs(expected.expected_tokens_per_forward[4] - spec.stats.tokens_per_forward) < 0.6
    assert spec.stats.tokens_per_forward > 1.3  # the model does draft; the comparison is not 1 vs 1


def constant_model(n_future: int) -> torch.nn.Module:
    """Every head's logits are all zero, so every head's argmax is token 0 whatever the input."""
    model = random_model("transformer", n_future=n_future)
    with torch.no_grad():
        model.unembedding.norm.weight.zero_()
    return model


@pytest.mark.parametrize("n_future", [2, 4])
def test_heads_that_always_agree_with_head_1_give_k_tokens_per_forward(n_future):
    model = constant_model(n_future)
    windows = torch.tensor([TOKENIZER.encode(TEXT[i : i + 60]) for i in (0, 17, 40)])  # [3, 60]
    result = measure(model, windows, per_window=20)
    for k in range(1, n_future + 1):
        assert result.expected_tokens_per_forward[k] == pytest.approx(k)
    assert all(rate == 1.0 for rate in result.kept_rate.values())
    decoded = Decoder(model, StopRules(TOKENIZER, 41), heads=n_future).generate(windows[:, :10].tolist())
    assert decoded.stats.accepted_drafts == decoded.stats.proposed_drafts  # real decoding agrees


def test_random_heads_accept_almost_nothing():
    model = random_model("transformer", init_std=0.3)
    windows = torch.tensor([TOKENIZER.encode(TEXT[i : i + 80]) for i in range(0, 400, 50)])  # [8, 80]
    result = measure(model, windows, per_window=30)
    assert result.positions == 8 * 30
    assert 1.0 <= result.expected_tokens_per_forward[4] < 1.1
    assert sum(result.accepted_histogram) == result.positions


@pytest.mark.parametrize("head_type", ["linear", "sequential"])
def test_other_head_types_replay_decoding_too(head_type):
    model = train_on_text(random_model(head_type, n_future=3, init_std=0.02), steps=30)
    ids = TOKENIZER.encode("x2 = y[")
    plain = Decoder(model, StopRules(TOKENIZER, 30), heads=1).generate([ids]).completions[0]
    text = ids + plain.tokens
    prefixes = torch.arange(len(ids), len(text) + 1)[None]
    kept = dict(zip(prefixes[0].tolist(), accepted_drafts(draft_matches(model, torch.tensor([text]), prefixes)[0]).tolist()))
    result = Decoder(model, StopRules(TOKENIZER, 30), heads=3).generate([ids])
    assert (result.stats.forwards, result.stats.accepted_drafts) == walk(kept, len(ids), plain.consumed, 3)


def test_summary_by_hand():
    matches = torch.tensor([[True, True, False], [True, False, True], [False, True, True], [True, True, True]])
    result = summarize(matches, 4)  # L = 2, 1, 0, 3
    assert result.accepted_histogram == [1, 1, 1, 1]
    assert result.match_rate == {2: 0.75, 3: 0.75, 4: 0.75}
    assert result.kept_rate == {2: 0.75, 3: 0.5, 4: 0.25}
    assert result.expected_tokens_per_forward == {1: 1.0, 2: 1.75, 3: 2.25, 4: 2.5}
    assert result.conditional_rate == pytest.approx({2: 0.75, 3: 2 / 3, 4: 0.5})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_acceptance_on_gpu_in_float32_and_bfloat16():
    """The constructed extreme holds on CUDA too, and bfloat16 runs (MTPModel puts weights on the GPU)."""
    model = constant_model(4).float()
    assert next(model.parameters()).device.type == "cuda"
    windows = torch.tensor([TOKENIZER.encode(TEXT[i : i + 60]) for i in (0, 17, 40)])
    assert measure(model, windows, per_window=20).expected_tokens_per_forward[4] == pytest.approx(4.0)
    result = measure(random_model("transformer", init_std=0.3).to(torch.bfloat16), windows, per_window=20)
    assert 1.0 <= result.expected_tokens_per_forward[4] <= 4.0

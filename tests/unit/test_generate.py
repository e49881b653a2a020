"""Generation: the KV cache against full forwards, and greedy speculative decoding against plain decoding.

Models are float64 so that a different order of floating-point sums
between a one-token step and a K-token verifying block cannot flip an
argmax; the contract under test is the algorithm's, token for token.
"""

import pytest
import torch

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.errors import UserError
from pretrain.inference.decode import Decoder
from pretrain.inference.forward import cached_logits
from pretrain.inference.kv_cache import kv_cached
from pretrain.inference.prompts import benchmark_prompts, heldout_documents, heldout_function_prompt, heldout_functions
from pretrain.inference.sampling import Sampling
from pretrain.inference.stopping import StopRules
from pretrain.model.config import HEAD_TYPES, ModelConfig
from pretrain.model.mtp import MTPModel

TOKENIZER = ByteTokenizer()
# A periodic "program" a tiny model memorises in a few dozen steps, so its heads draft well.
TEXT = "".join(f"x{i % 7} = y[{i % 5}] + {i % 3}\n" for i in range(60))


def random_model(head_type: str, n_future: int = 4, **overrides) -> MTPModel:
    torch.manual_seed(0)
    fields = dict(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  n_future=n_future, head_type=head_type, init_std=0.3, max_seq_len=128)
    return MTPModel(ModelConfig(**{**fields, **overrides}), params_dtype=torch.float64).eval()


def train_on_text(model: MTPModel, steps: int = 60, seq_len: int = 48) -> MTPModel:
    """Overfit `TEXT` (every window of it, in rotation) so later heads guess right most of the time."""
    data = torch.tensor(TOKENIZER.encode(TEXT))
    n = model.cfg.n_future
    starts = torch.arange(0, len(data) - seq_len - n, 7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        rows = starts[(torch.arange(8) + 8 * step) % len(starts)]
        windows = torch.stack([data[a : a + seq_len + n] for a in rows.tolist()])  # [8, s + n]
        labels = torch.stack([windows[:, k : k + seq_len] for k in range(1, n + 1)], dim=1)  # [8, n, s]
        loss, _ = model(windows[:, :seq_len], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=HEAD_TYPES)
def trained(request) -> MTPModel:
    return train_on_text(random_model(request.param, init_std=0.02))


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def decode(model, prompts, heads, max_new=24, **rules):
    result = Decoder(model, StopRules(TOKENIZER, max_new, **rules), heads).generate(prompts)
    return [c.tokens for c in result.completions], result


def greedy_without_cache(model, prompt: list[int], max_new: int) -> list[int]:
    """Reference decoding: the whole sequence through the training forward at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model.head_logits(torch.tensor([ids], device=device_of(model)))[0, -1, 0].argmax())
            if token == TOKENIZER.eod_id:
                break
            ids.append(token)
    return ids[len(prompt) :]


PROMPTS = [TOKENIZER.encode(t) for t in ("def f(x):\n", "import os", "x", "class A:\n    pass\n\n", "y[3] =")]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_forward_matches_full_forward_across_rollbacks(head_type):
    model = random_model(head_type, n_future=3)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(device_of(model))  # [b, s]
    with torch.no_grad():
        full = model.head_logits(ids)  # [b, s, n, V]
        with kv_cached(model, 3, batch=2, max_len=20) as state:
            first = cached_logits(model, state, ids[:, :5], 3)
            state.commit(torch.tensor([5, 5]))
            second = cached_logits(model, state, ids[:, 5:9], 3)
            state.commit(torch.tensor([2, 4]))  # sequence 0 rolls back positions 7, 8
            third = cached_logits(model, state, torch.stack([ids[0, 7:10], ids[1, 9:12]]), 3)
    torch.testing.assert_close(first, full[:, :5], rtol=0, atol=1e-10)
    torch.testing.assert_close(second, full[:, 5:9], rtol=0, atol=1e-10)
    torch.testing.assert_close(third[0], full[0, 7:10], rtol=0, atol=1e-10)
    torch.testing.assert_close(third[1], full[1, 9:12], rtol=0, atol=1e-10)


def test_caches_are_detached_after_decoding():
    model = random_model("transformer")
    decode(model, PROMPTS[:2], heads=3, max_new=3)
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_plain_greedy_equals_greedy_without_cache(head_type):
    model = random_model(head_type)
    got, _ = decode(model, PROMPTS, heads=1, max_new=12)
    assert got == [greedy_without_cache(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("max_new", [1, 2, 9, 31])
def test_speculative_greedy_equals_plain_on_random_models(head_type, max_new):
    model = random_model(head_type)
    plain, _ = decode(model, PROMPTS, heads=1, max_new=max_new)
    for heads in (2, 3, 4):
        assert decode(model, PROMPTS, heads=heads, max_new=max_new)[0] == plain, f"K={heads}"


def test_trained_model_drafts_are_accepted_and_rejected_and_output_is_unchanged(trained):
    # In-distribution prompts (drafts mostly right) mixed with foreign ones (drafts mostly wrong),
    # of different lengths, so the sequences of one batch keep different numbers of drafts.
    prompts = [TOKENIZER.encode(t) for t in (TEXT[10:40], "zq" + TEXT[100:117], "hello world", TEXT[5:8], "#!")]
    plain, _ = decode(trained, prompts, heads=1, max_new=40)
    for heads in (2, 3, 4):
        got, result = decode(trained, prompts, heads=heads, max_new=40)
        assert got == plain, f"K={heads}"
        stats = result.stats
        assert 0 < stats.accepted_drafts < stats.proposed_drafts, f"K={heads}: {stats}"
        per_sequence = {c.consumed / c.forwards for c in result.completions}
        assert len(per_sequence) > 1, "every sequence accepted alike: the batch exercised nothing ragged"
    assert stats.tokens_per_forward > 1.5  # K=4 on memorised text: drafts do save forwards


def test_stop_string_ends_plain_and_speculative_alike(trained):
    prompts = [TOKENIZER.encode(TEXT[:20]), TOKENIZER.encode(TEXT[33:50])]
    unstopped, _ = decode(trained, prompts, heads=1, max_new=40)
    stop = TOKENIZER.decode(unstopped[0][6:9])  # text the first completion is known to produce
    plain, plain_result = decode(trained, prompts, heads=1, max_new=40, stop_strings=(stop,))
    spec, spec_result = decode(trained, prompts, heads=4, max_new=40, stop_strings=(stop,))
    assert spec == plain
    assert [c.text for c in spec_result.completions] == [c.text for c in plain_result.completions]
    first = spec_result.completions[0]
    assert first.finish_reason == "stop" and len(first.tokens) <= 9
    assert stop in TOKENIZER.decode(first.tokens) and stop not in first.text


def test_stop_rules_cut_at_eod_length_and_stop_string():
    rules = StopRules(TOKENIZER, max_new_tokens=5, stop_strings=("ab",))
    eod = rules.start()
    assert rules.extend(eod, [120, TOKENIZER.eod_id, 121]) == 2
    assert (eod.tokens, eod.finish_reason) == ([120], "eod")
    length = rules.start()
    assert rules.extend(length, [120] * 3) == 3 and not length.done
    assert rules.extend(length, [120] * 4) == 2
    assert (len(length.tokens), length.finish_reason) == (5, "length")
    stop = rules.start()
    rules.extend(stop, TOKENIZER.encode("xxab") + [120])
    assert (rules.finish(stop).text, stop.tokens, stop.finish_reason) == ("xx", TOKENIZER.encode("xxab"), "stop")


def test_bad_requests_are_named():
    model = random_model("transformer", n_future=2)
    rules = StopRules(TOKENIZER, 8)
    with pytest.raises(UserError, match="has 2 heads"):
        Decoder(model, rules, heads=3)
    with pytest.raises(UserError, match="prompt 2 is empty"):
        Decoder(model, rules).generate([[1], []])
    with pytest.raises(UserError, match="max_seq_len 128"):
        Decoder(model, rules).generate([[1] * 125])
    with pytest.raises(UserError, match="--temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(UserError, match="--top-p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(UserError, match="--max-new-tokens"):
        StopRules(TOKENIZER, 0)


def test_heldout_prompts_are_fixed_windows_of_heldout_files():
    documents = heldout_documents()
    prompts = benchmark_prompts(TOKENIZER, 5, 300)
    assert prompts == benchmark_prompts(TOKENIZER, 5, 300) and [len(p) for p in prompts] == [300] * 5
    assert all(any(bytes(p) in d.encode("utf-8") for d in documents) for p in prompts)  # byte ids are bytes
    head, body = heldout_functions()[0]
    assert head.rstrip().endswith((":", '"""', "'''")) and body.strip()
    prompt = heldout_function_prompt(0, TOKENIZER, 100)
    assert head.endswith(prompt) and len(TOKENIZER.encode(prompt)) <= 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoding_on_gpu_in_float32_and_bfloat16():
    model = random_model("transformer").float()
    assert device_of(model).type == "cuda"
    plain, _ = decode(model, PROMPTS, heads=1, max_new=16)
    assert decode(model, PROMPTS, heads=4, max_new=16)[0] == plain
    bf16 = model.to(torch.bfloat16)
    got, result = decode(bf16, PROMPTS, heads=4, max_new=16)
    assert all(c.done for c in result.completions) and result.stats.tokens > 0

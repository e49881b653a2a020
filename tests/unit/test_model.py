"""The MTP model: learning, causality, attention, sizes, FLOPs, parallel setup."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from parallel.megatron_setup import init_model_parallel
from pretrain.errors import UserError
from pretrain.model.attention import causal_mask
from pretrain.model.config import HEAD_TYPES, ModelConfig
from pretrain.model.counting import flops_per_token, param_counts
from pretrain.model.mtp import MTPModel


def tiny(head_type="transformer", n_future=3, **overrides) -> ModelConfig:
    fields = dict(vocab_size=16, d_model=32, n_layers=3, n_heads=4, n_future=n_future, head_type=head_type,
                  loss_chunk_tokens=16)
    return ModelConfig(**{**fields, **overrides})


def shifted_batch(seq: torch.Tensor, seq_len: int, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [b, s] and labels [b, n, s] where head k's labels are the inputs shifted by k."""
    labels = torch.stack([seq[:, k + 1 : k + 1 + seq_len] for k in range(n_future)], dim=1)
    return seq[:, :seq_len], labels


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_tiny_model_memorises_a_repeated_sequence(head_type):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type))
    seq = torch.randint(0, 16, (2, 27), generator=torch.Generator().manual_seed(5))
    ids, labels = shifted_batch(seq, 24, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, head_losses = model(ids, labels)
        first = head_losses if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if head_losses.max() < 0.05:
            break
    assert first.min() > 2.0  # started near log(16): nothing was learnt before training
    assert head_losses.max() < 0.05, f"{head_type} heads stuck at {head_losses.tolist()}"


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_no_head_sees_the_future(head_type):
    torch.manual_seed(0)
    model = MTPModel(tiny(head_type), params_dtype=torch.float64)
    ids = torch.randint(0, 16, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 16
    with torch.no_grad():
        before, after = model.head_logits(ids), model.head_logits(changed)  # [b, s, n, V]
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_sequential_heads_draft_with_their_own_guesses():
    torch.manual_seed(0)
    model = MTPModel(tiny("sequential", 3), params_dtype=torch.float64)
    ids = torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        drafted = model.head_logits(ids)  # [b, s, n, V]
        guesses = drafted.argmax(-1).transpose(1, 2)  # [b, n, s]
        forced = model.head_logits(ids, labels=guesses)
        other = model.head_logits(ids, labels=(guesses + 1) % 16)
    torch.testing.assert_close(drafted, forced, rtol=0, atol=0)
    torch.testing.assert_close(drafted[:, :, 0], other[:, :, 0], rtol=0, atol=0)  # head 1 reads no token
    assert not torch.allclose(drafted[:, :, 1:], other[:, :, 1:])


def test_attention_with_a_longer_key_prefix_matches_full_attention():
    """A query block at the end of a longer key sequence (what a KV cache gives) sees exactly its past."""
    torch.manual_seed(0)
    layer = MTPModel(tiny(n_kv_heads=2), params_dtype=torch.float64).layers[0].self_attention.core_attention
    q = torch.randn(7, 2, 4, 8, dtype=torch.float64)  # [s, b, heads, hn]
    k, v = torch.randn(7, 2, 2, 8, dtype=torch.float64), torch.randn(7, 2, 2, 8, dtype=torch.float64)
    full = layer(q, k, v, None)  # [s, b, heads * hn]
    tail = layer(q[4:], k, v, None)
    torch.testing.assert_close(tail, full[4:], rtol=1e-12, atol=1e-12)
    assert torch.equal(causal_mask(2, 4, torch.device("cpu")), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())


def test_gqa_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    layer = MTPModel(tiny(n_kv_heads=2), params_dtype=torch.float64).layers[0].self_attention.core_attention
    q = torch.randn(5, 1, 4, 8, dtype=torch.float64)
    k, v = torch.randn(5, 1, 2, 8, dtype=torch.float64), torch.randn(5, 1, 2, 8, dtype=torch.float64)
    repeated = layer(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), None)
    torch.testing.assert_close(layer(q, k, v, None), repeated, rtol=1e-12, atol=1e-12)


def small_counted(**overrides) -> ModelConfig:
    # d=64, 4 query heads of 16, 2 kv heads, ffn 192, vocab 100 -> padded 128.
    fields = dict(vocab_size=100, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=192, n_future=2)
    return ModelConfig(**{**fields, **overrides})


# One layer by hand: Q 64*64 + K,V 2*64*32 + out 64*64 + SwiGLU 3*64*192 + two norms 2*64.
LAYER = 4096 + 4096 + 4096 + 36864 + 128  # 49280
EMBEDDING = 128 * 64  # padded vocabulary x d = 8192
UNEMBEDDING = 128 * 64 + 64  # output weight + final norm = 8256


@pytest.mark.parametrize(
    "overrides, trunk, heads",
    [
        (dict(match_params=True), 2 * LAYER, 2 * LAYER),  # 4 layers in all: 2 trunk + 2 heads
        (dict(), 3 * LAYER, 2 * LAYER),
        (dict(head_type="linear"), 3 * LAYER, 2 * 64 * 64),
        (dict(head_type="sequential"), 3 * LAYER, 2 * LAYER + 2 * 64 * 64 + 2 * 64),  # 2d->d + 2 norms for head 2
    ],
)
def test_param_counts_by_hand(overrides, trunk, heads):
    counts = param_counts(MTPModel(small_counted(**overrides)))
    expected = dict(embedding=EMBEDDING, trunk=trunk, heads=heads, unembedding=UNEMBEDDING)
    assert counts == {**expected, "total": sum(expected.values())}


def test_match_params_keeps_the_baseline_size():
    baseline = MTPModel(small_counted(n_layers=5, n_future=1))
    matched = MTPModel(small_counted(n_layers=5, n_future=4, match_params=True))
    assert (len(baseline.layers), len(matched.layers), len(matched.heads.layers)) == (4, 1, 4)
    assert param_counts(matched)["total"] == param_counts(baseline)["total"]


def test_flops_per_token_by_hand():
    cfg = small_counted(match_params=True)  # trunk 2 layers, 2 transformer heads
    layer_matmuls = LAYER - 128
    expected = 6 * (2 * layer_matmuls + 2 * layer_matmuls + 2 * 100 * 64) + 12 * 4 * 64 * 32
    assert flops_per_token(cfg, seq_len=32) == expected == 1354752
    linear = small_counted(head_type="linear")
    assert flops_per_token(linear, 32) == 6 * (3 * layer_matmuls + 2 * 64 * 64 + 2 * 100 * 64) + 12 * 3 * 64 * 32


def test_initialisation_follows_megatron():
    torch.manual_seed(0)
    cfg = small_counted(d_model=256, n_heads=4, n_kv_heads=4, ffn_hidden=512, n_layers=8, init_std=0.02)
    model = MTPModel(cfg)  # residual depth 7 trunk + 1 head layer = 8
    params = dict(model.named_parameters())
    assert params["layers.0.self_attention.linear_qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert params["layers.3.mlp.linear_fc2.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert params["heads.layers.0.self_attention.linear_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(params["unembedding.norm.weight"], torch.ones(256))
    assert not params["embedding.embed.weight"][100:].any(), "padding rows of the vocabulary start at zero"
    assert not params["unembedding.output.weight"][100:].any()


def test_weights_depend_on_the_seed_and_name_only():
    """Same seed, same weights (whatever else was drawn before); another seed, other weights."""
    first = dict(MTPModel(tiny(), seed=7).named_parameters())
    torch.rand(1000)  # the global generator plays no part
    again = dict(MTPModel(tiny(), seed=7).named_parameters())
    other = dict(MTPModel(tiny(), seed=8).named_parameters())
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["layers.0.mlp.linear_fc1.weight"], other["layers.0.mlp.linear_fc1.weight"])
    more_heads = dict(MTPModel(tiny(n_future=4), seed=7).named_parameters())  # a 4th head changes no other weight
    assert set(first) < set(more_heads) and all(torch.equal(first[k], more_heads[k]) for k in first)


def test_meta_device_builds_shapes_without_memory():
    model = MTPModel(small_counted(), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert param_counts(model) == param_counts(MTPModel(small_counted()))


def test_head_losses_are_cross_entropies_of_head_logits():
    torch.manual_seed(0)
    model = MTPModel(tiny("linear", 2, vocab_size=50), params_dtype=torch.float64)  # vocab padded to 128
    seq = torch.randint(0, 50, (2, 14))
    ids, labels = shifted_batch(seq, 12, 2)
    with torch.no_grad():
        _, head_losses = model(ids, labels)
        logits = model.head_logits(ids)
    assert logits.shape == (2, 12, 2, 50)
    for k in range(2):
        expected = F.cross_entropy(logits[:, :, k].reshape(-1, 50), labels[:, k].reshape(-1))
        torch.testing.assert_close(head_losses[k], expected, rtol=1e-12, atol=0)


def test_bad_inputs_are_named():
    with pytest.raises(UserError, match="vocab_size"):
        MTPModel(tiny(vocab_size=None))
    model = MTPModel(tiny())
    with pytest.raises(ValueError, match=r"labels must be \[b, n_future, s\]"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 2, 5, dtype=torch.long))


def test_parallel_setup_is_idempotent():
    init_model_parallel()
    init_model_parallel(tp=1, pp=1)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    with pytest.raises(RuntimeError, match="already exist"):
        init_model_parallel(tp=2)


def test_padded_vocab():
    assert ModelConfig(vocab_size=257).padded_vocab(1) == 384
    assert ModelConfig(vocab_size=257).padded_vocab(4) == 512
    assert ModelConfig(vocab_size=32000).padded_vocab(2) == 32000

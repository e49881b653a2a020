"""The head-by-head fused loss against the plain all-logits loss, in float64.

Every parameter's gradient must match a single backward through
materialised logits, for every head type and n, with chunks smaller than
the token count and with a loss scale (grad_output != 1) as DeepSpeed's
loss scaler applies.
"""

import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import IGNORE_INDEX, fused_cross_entropy, naive_mtp_loss
from pretrain.model.config import HEAD_TYPES, ModelConfig
from pretrain.model.mtp import MTPModel

B, S, VOCAB = 2, 11, 50  # 22 tokens, vocab padded to 128


def make_model(head_type="transformer", n_future=2, seed=0, **overrides) -> MTPModel:
    """A small float64 model with every weight random (norm gains too), so no gradient is trivially 0."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                  n_future=n_future, head_type=head_type, loss_chunk_tokens=5)
    cfg = ModelConfig(**{**fields, **overrides})
    model = MTPModel(cfg, params_dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def make_batch(n_future: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    labels = torch.randint(0, VOCAB, (B, n_future, S), generator=gen)
    labels[0, :, -3:] = IGNORE_INDEX
    labels[1, n_future - 1, :4] = IGNORE_INDEX
    return ids, labels


def fused_grads(model, ids, labels, step=0, grad_output=1.0):
    model.zero_grad(set_to_none=True)
    loss, head_losses = model(ids, labels, step)
    (loss * grad_output).backward()
    return loss.detach(), head_losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def naive_grads(model, ids, labels, step=0, grad_output=1.0):
    model.zero_grad(set_to_none=True)
    z = model.trunk(ids)
    targets = labels.permute(1, 2, 0).contiguous()
    stack = model.head_stack(S, z.device, lambda i, _: targets[i].clamp(min=0))
    loss, head_losses = naive_mtp_loss(z, targets, stack, model.cfg.head_scales(step))
    (loss * grad_output).backward()
    return loss.detach(), head_losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    loss_a, heads_a, grads_a = a
    loss_b, heads_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=0)
    torch.testing.assert_close(heads_a, heads_b, rtol=1e-10, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_b[name].abs().max() > 0, f"{name} got no gradient at all"
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-13, msg=name)


@pytest.mark.parametrize("n_future", [1, 2, 4])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_fused_matches_naive_on_every_parameter(head_type, n_future):
    model = make_model(head_type, n_future, head_weights=[1.0 + 0.5 * k for k in range(n_future)], aux_factor=0.7)
    ids, labels = make_batch(n_future)
    assert_same(fused_grads(model, ids, labels), naive_grads(model, ids, labels))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_incoming_gradient_scales_everything(head_type):
    """DeepSpeed's loss scaler backpropagates scale * loss: every gradient must scale with it."""
    model = make_model(head_type, 3)
    ids, labels = make_batch(3)
    assert_same(fused_grads(model, ids, labels, grad_output=1024.0), naive_grads(model, ids, labels, grad_output=1024.0))


def test_micro_batches_accumulate_into_grad():
    model = make_model("sequential", 2)
    batches = [make_batch(2, seed) for seed in (1, 2)]
    for ids, labels in batches:
        model(ids, labels)[0].backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for ids, labels in batches:
        z = model.trunk(ids)
        targets = labels.permute(1, 2, 0).contiguous()
        stack = model.head_stack(S, z.device, lambda i, _, targets=targets: targets[i].clamp(min=0))
        naive_mtp_loss(z, targets, stack, model.cfg.head_scales(0))[0].backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-9, atol=1e-13, msg=name)


def per_head_grads(head_type, n_future, ids, labels):
    """Gradients of each head's loss alone (weight 1 on head k, 0 elsewhere)."""
    grads = []
    for k in range(n_future):
        weights = [1.0 if j == k else 0.0 for j in range(n_future)]
        grads.append(fused_grads(make_model(head_type, n_future, head_weights=weights), ids, labels)[2])
    return grads


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_weights_and_aux_schedule_scale_gradients_linearly(head_type):
    n = 3
    ids, labels = make_batch(n)
    singles = per_head_grads(head_type, n, ids, labels)
    weights = [2.0, 0.5, 3.0]
    model = make_model(head_type, n, head_weights=weights, aux_factor=0.9, aux_schedule=[[0, 0.3], [5, 0.1]])
    for step, aux in [(0, 0.3), (4, 0.3), (5, 0.1), (100, 0.1)]:
        scales = [weights[0], weights[1] * aux, weights[2] * aux]
        assert model.cfg.head_scales(step) == pytest.approx(scales)
        _, _, grads = fused_grads(model, ids, labels, step=step)
        for name, grad in grads.items():
            expected = sum(s * g[name] for s, g in zip(scales, singles))
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-13, msg=f"step {step} {name}")


def test_zero_weight_head_leaves_its_own_layer_untouched():
    ids, labels = make_batch(2)
    _, _, grads = fused_grads(make_model("transformer", 2, head_weights=[1.0, 0.0]), ids, labels)
    assert all(g.abs().max() == 0 for name, g in grads.items() if name.startswith("heads.layers.1."))
    assert all(g.abs().max() > 0 for name, g in grads.items() if name.startswith("heads.layers.0."))


def test_ignored_tokens_carry_no_loss():
    model = make_model("transformer", 2)
    ids, labels = make_batch(2)
    _, head_losses = model(ids, labels)
    logits = model.head_logits(ids)  # [b, s, n, V]
    for k in range(2):
        expected = F.cross_entropy(logits[:, :, k].reshape(-1, VOCAB), labels[:, k].reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(head_losses[k], expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(head_type):
    model = make_model(head_type, 2)
    ids, labels = make_batch(2)
    labels[:] = IGNORE_INDEX
    loss, head_losses = model(ids, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(head_losses, torch.zeros(2, dtype=torch.float64))
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, torch.zeros_like(param)), name


def test_one_empty_head_only_drops_that_head():
    model = make_model("transformer", 2)
    ids, labels = make_batch(2)
    labels[:, 1] = IGNORE_INDEX
    loss, head_losses = model(ids, labels)
    loss.backward()
    assert head_losses[1] == 0 and head_losses[0] > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_grad_computes_losses_only(monkeypatch):
    import pretrain.loss.schedule as schedule

    model = make_model("sequential", 3)
    ids, labels = make_batch(3)
    with_grad = model(ids, labels)
    grad_scales = []

    def spy(*args, **kwargs):
        grad_scales.append(kwargs.get("grad_scale"))
        return fused_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(schedule, "fused_cross_entropy", spy)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss, head_losses = model(ids, labels)
    assert grad_scales == [None, None, None]
    assert not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(loss, with_grad[0].detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(head_losses, with_grad[1], rtol=1e-12, atol=0)


def test_second_backward_is_refused():
    model = make_model("transformer", 2)
    loss, _ = model(*make_batch(2))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_cross_entropy_against_autograd(chunk):
    """Loss, hidden and weight gradients of the chunked kernel; padded vocab rows stay at zero."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(128, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (20,), generator=gen)
    targets[[2, 9]] = IGNORE_INDEX
    grad_weight = torch.zeros_like(weight)
    loss, grad_hidden = fused_cross_entropy(hidden.detach(), weight.detach(), targets, VOCAB, chunk, 0.25, grad_weight)
    expected = F.cross_entropy((hidden @ weight.t())[:, :VOCAB], targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (0.25 * expected).backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_hidden, hidden.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(grad_weight[VOCAB:], torch.zeros_like(grad_weight[VOCAB:]))

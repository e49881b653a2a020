"""Another library's fused linear + cross-entropy inside the head-by-head schedule (pretrain/loss/library_ce.py).

liger-kernel needs a GPU and neither library is installed here, so the
wrapper is held to `fused_cross_entropy` with torch's own cross-entropy on
materialised logits as the library: every parameter's gradient through the
whole schedule must match ours in float64. tests/gpu runs the real libraries.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from pretrain.cli import main
from pretrain.loss import IGNORE_INDEX, mtp_loss
from pretrain.loss.library_ce import as_fused_cross_entropy
from tests.unit.test_loss import S, make_batch, make_model


def torch_loss_sum(hidden, weight, targets):  # [T, d], [V, d], [T] -> summed CE, as the libraries compute it
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def schedule_grads(model, ids, labels, cross_entropy=None):
    model.zero_grad(set_to_none=True)
    z = model.trunk(ids)  # [s, b, d]
    targets = labels.permute(1, 2, 0).contiguous()  # [n, s, b]
    stack = model.head_stack(S, z.device, lambda i, _: targets[i].clamp(min=0))
    extra = {} if cross_entropy is None else {"cross_entropy": cross_entropy}
    loss, head_losses = mtp_loss(z, targets, stack, model.cfg.head_scales(0), model.cfg.loss_chunk_tokens, **extra)
    (0.5 * loss).backward()
    return head_losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_wrapped_library_gives_the_schedule_our_gradients(head_type):
    model = make_model(head_type, n_future=3, head_weights=[1.0, 0.5, 0.25])
    ids, labels = make_batch(3)
    ours_losses, ours = schedule_grads(model, ids, labels)
    lib_losses, lib = schedule_grads(model, ids, labels, as_fused_cross_entropy(torch_loss_sum))
    torch.testing.assert_close(lib_losses, ours_losses, rtol=1e-10, atol=0)
    assert lib.keys() == ours.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(lib[name], grad, rtol=1e-9, atol=1e-13, msg=name)
    assert ours["unembedding.output.weight"][model.cfg.vocab_size:].abs().max() == 0  # padding rows: no gradient
    assert lib["unembedding.output.weight"][model.cfg.vocab_size:].abs().max() == 0


def test_wrapped_library_without_grad_gives_losses_only():
    model = make_model(n_future=2)
    ids, labels = make_batch(2)
    with torch.no_grad():
        z = model.trunk(ids)
        targets = labels.permute(1, 2, 0).contiguous()
        stack = model.head_stack(S, z.device, lambda i, _: targets[i].clamp(min=0))
        ours = mtp_loss(z, targets, stack, [1.0, 1.0], 5)[1]
        lib = mtp_loss(z, targets, stack, [1.0, 1.0], 5, as_fused_cross_entropy(torch_loss_sum))[1]
    torch.testing.assert_close(lib, ours, rtol=1e-10, atol=0)
    assert model.unembedding.weight.grad is None


def test_liger_on_a_cpu_is_one_line_and_exit_2(capsys):
    assert main(["bench", "loss-memory", "--small", "--impls", "fused,liger"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "liger runs only on a CUDA GPU" in err


def test_missing_library_names_the_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # makes the import fail, installed or not
    assert main(["bench", "loss-memory", "--small", "--impls", "cce"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e .[gpu-kernels]" in err


def test_unknown_impl_is_one_line_and_exit_2(capsys):
    assert main(["bench", "loss-memory", "--small", "--impls", "naive,fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--impls takes names from" in err

"""Other libraries' fused linear + cross-entropy, in `fused_cross_entropy`'s contract, to measure ours against.

liger-kernel's `LigerFusedLinearCrossEntropyLoss` and Apple's
cut-cross-entropy (`linear_cross_entropy`) each fuse the unembedding matmul
with the cross-entropy in Triton kernels, so, like ours, they never hold a
whole head's logits. `mtp bench loss-memory --impls fused,liger,cce` runs
each inside the per-head schedule (as `mtp_loss(cross_entropy=...)`) on the
same weights and batch, with gradient parity against the naive loss. Training
keeps ours until a GPU run shows one faster at no memory cost
(docs/benchmarks.md#gpu-check-make-gpu-check); ours is also the only one
that is vocabulary-parallel, so these are tp=1 only.

Both libraries are optional (`pip install -e .[gpu-kernels]`; torch's CUDA
wheels already bring Triton). liger's kernels need a CUDA GPU; cut-cross-
entropy falls back to its `torch_compile` implementation on a CPU.
"""

import functools
import importlib
from collections.abc import Callable

import torch
from megatron.core import parallel_state

from parallel.kernels import LIBRARIES, library_problem
from pretrain.errors import UserError
from pretrain.loss.fused_ce import IGNORE_INDEX

LossSum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # hidden, weight, targets -> sum


def _liger(device_type: str) -> LossSum:
    module = importlib.import_module(LIBRARIES["liger"])
    loss = module.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


def _cce(device_type: str) -> LossSum:
    module = importlib.import_module(LIBRARIES["cce"])
    impl = "cce" if device_type == "cuda" else "torch_compile"  # the Triton kernels are CUDA-only
    return lambda hidden, weight, targets: module.linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", impl=impl
    )


_BUILDERS = {"liger": _liger, "cce": _cce}


@functools.cache  # built once per process: the bench's timed steps must not pay for imports and set-up
def library_cross_entropy(name: str, device_type: str) -> Callable:
    """A function with `fused_cross_entropy`'s signature backed by library `name` (UserError if unusable)."""
    why = library_problem(name, device_type)
    if why:
        raise UserError(why)
    return as_fused_cross_entropy(_BUILDERS[name](device_type))


def as_fused_cross_entropy(loss_sum_of: LossSum) -> Callable:
    """Wrap `loss_sum_of(hidden [T, d], weight [V, d], targets [T]) -> summed CE` in our contract.

    The library builds its own autograd graph; one `torch.autograd.grad` of
    `grad_scale * loss_sum` gives what `fused_cross_entropy` returns: the
    gradient of the hidden states, and the weight's added into `grad_weight`.
    The padding rows of the vocabulary are sliced off, so they get zero gradient.
    """

    def cross_entropy(hidden, weight, targets, vocab_size, chunk_tokens, grad_scale=None, grad_weight=None):
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("library cross-entropies are not vocabulary-parallel: tp=1 only")
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        h = hidden.detach().requires_grad_(grad_scale is not None)  # [T, d]
        w = weight.detach().requires_grad_(grad_scale is not None and grad_weight is not None)  # [V_padded, d]
        with torch.set_grad_enabled(grad_scale is not None):
            loss_sum = loss_sum_of(h, w[:vocab_size], targets)  # scalar
        if grad_scale is None:
            return loss_sum.detach().to(acc_dtype), None
        wrt = [h, w] if w.requires_grad else [h]
        grads = torch.autograd.grad(loss_sum * grad_scale, wrt)
        if grad_weight is not None:
            grad_weight += grads[1].to(grad_weight.dtype)
        return loss_sum.detach().to(acc_dtype), grads[0].to(acc_dtype)

    return cross_entropy

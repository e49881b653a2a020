"""The paper's memory-efficient loss schedule as one autograd function.

The trunk output z enters detached. For each head in turn: head forward,
fused chunked unembedding + cross-entropy (gradients of the normalised
hidden states and the unembedding weight come out of it directly), backward
of that head down to z, then the head's activations are dropped. Peak memory
holds one head's activations and one chunk of logits, whatever n is.

All of this runs inside `forward` of `_HeadByHeadLoss`; the gradients for z,
the head parameters and the unembedding weight are kept and handed out by
`backward`, multiplied by the incoming gradient. So whoever calls
`loss.backward()` (plain torch, DeepSpeed's engines, a loss scaler that
backpropagates `scale * loss`) gets exactly the gradients of
`sum_k scale_k * mean CE_k`, and parameter gradients reach `.grad` through
autograd's own accumulation (micro-batch accumulation and engine hooks
work unchanged). The trunk then sees one accumulated gradient.

Under sequence parallelism z and every head's hidden state hold this rank's
s / tp positions; the vocabulary-parallel cross-entropy needs every position
on every rank (each holds a slice of the vocabulary), so each head's
normalised state is all-gathered along the sequence first and only this
rank's positions of its (all-reduced, hence whole) gradient flow back into
the head.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.loss.fused_ce import IGNORE_INDEX, fused_cross_entropy


@dataclass
class HeadStack:
    """What the loss needs from a model's output side."""

    hidden_states: Callable[[torch.Tensor], Iterator[torch.Tensor]]  # z [s, b, d] -> each head's [s, b, d]
    chained: bool  # head k's graph feeds head k+1 (sequential heads)
    norm: torch.nn.Module  # final norm before the unembedding
    weight: torch.nn.Parameter  # unembedding shard [padded_vocab / tp, d]
    vocab_size: int
    params: list[torch.nn.Parameter]  # every parameter `hidden_states` and `norm` read
    sequence_parallel: bool = False  # hidden states are [s / tp, b, d], this rank's positions


@dataclass
class _Plan:
    stack: HeadStack
    targets: torch.Tensor  # [n, s, b] token ids, IGNORE_INDEX where no loss
    scales: Sequence[float]
    chunk_tokens: int
    cross_entropy: Callable  # fused_cross_entropy's contract (pretrain/loss/library_ce.py wraps others in it)


def _valid_count(tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tokens that carry a loss, at least 1 so an all-ignored head gives 0, not NaN."""
    return (tokens != IGNORE_INDEX).sum().clamp(min=1).to(dtype)


def _accumulate(total: list, grads: Sequence[torch.Tensor | None]) -> None:
    for i, grad in enumerate(grads):
        if grad is not None:
            total[i] = grad if total[i] is None else total[i].add_(grad)


class _HeadByHeadLoss(torch.autograd.Function):
    """loss, head_losses = apply(plan, z, weight, *params); gradients stored in forward."""

    @staticmethod
    def forward(ctx, plan: _Plan, z: torch.Tensor, weight: torch.Tensor, *params: torch.Tensor):
        with torch.enable_grad():
            head_losses, grads = _run_heads(plan, z, weight, params)
        ctx.grads = grads
        total = (head_losses * head_losses.new_tensor(list(plan.scales))).sum()
        ctx.mark_non_differentiable(head_losses)
        return total, head_losses

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_head_losses: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the MTP loss can be backpropagated once per forward")
        grads, ctx.grads = ctx.grads, None
        return (None, *(None if g is None else g.mul_(grad_total) for g in grads))


def _whole_sequence(normed: torch.Tensor) -> torch.Tensor:
    """[s / tp, b, d] positions of every tensor-parallel rank -> [s, b, d], in rank order (no autograd)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    whole = normed.new_empty((tp * normed.shape[0], *normed.shape[1:]))  # [s, b, d]
    dist.all_gather_into_tensor(whole, normed.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return whole


def _own_positions(grad: torch.Tensor) -> torch.Tensor:
    """This rank's [s / tp, b, d] of a gradient [s, b, d] that is whole on every rank."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return grad.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]


def _head_loss(
    plan: _Plan, k: int, normed: torch.Tensor, weight: torch.Tensor, weight_grad: torch.Tensor | None, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head k's mean loss and, if wanted (and its scale is not 0), d(scale_k * loss)/d normed.

    normed is [s, b, d], or [s / tp, b, d] under sequence parallelism; the
    gradient has its shape.
    """
    sequence_parallel = plan.stack.sequence_parallel
    whole = _whole_sequence(normed.detach()) if sequence_parallel else normed.detach()  # [s, b, d]
    tokens = plan.targets[k].reshape(-1)  # [s * b]
    n_valid = _valid_count(tokens, torch.promote_types(weight.dtype, torch.float32))
    scale = plan.scales[k] if want_grad else 0.0
    loss_sum, grad_normed = plan.cross_entropy(
        whole.reshape(-1, whole.shape[-1]),  # [s * b, d]
        weight.detach(),
        tokens,
        plan.stack.vocab_size,
        plan.chunk_tokens,
        grad_scale=scale / n_valid if scale else None,
        grad_weight=weight_grad,
    )
    if grad_normed is not None:
        grad_normed = grad_normed.view_as(whole)  # [s, b, d]
        grad_normed = (_own_positions(grad_normed) if sequence_parallel else grad_normed).to(normed.dtype)
    return loss_sum / n_valid, grad_normed


def _run_heads(plan: _Plan, z: torch.Tensor, weight: torch.Tensor, params: Sequence[torch.Tensor]):
    """Every head's forward and backward; returns (head_losses [n], grads for (z, weight, *params))."""
    z_leaf = z.detach().requires_grad_(z.requires_grad)  # [s, b, d]
    inputs = [z_leaf, *params]
    trainable = [i for i, t in enumerate(inputs) if t.requires_grad]
    wrt = [inputs[i] for i in trainable]
    input_grads: list = [None] * len(wrt)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    weight_grad = torch.zeros_like(weight, dtype=acc_dtype) if weight.requires_grad else None
    want_grad = bool(wrt) or weight_grad is not None
    losses, outputs, grad_outputs = [], [], []
    for k, hidden in enumerate(plan.stack.hidden_states(z_leaf)):
        normed = plan.stack.norm(hidden)  # [s, b, d]
        loss, grad_normed = _head_loss(plan, k, normed, weight, weight_grad, want_grad)
        losses.append(loss)
        if grad_normed is None or not wrt:
            continue
        if plan.stack.chained:  # later heads still need this head's graph: one backward at the end
            outputs.append(normed)
            grad_outputs.append(grad_normed)
        else:
            _accumulate(input_grads, torch.autograd.grad(normed, wrt, grad_normed, allow_unused=True))
    if outputs:
        _accumulate(input_grads, torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
    grads: list = [None] * len(inputs)
    for i, grad in zip(trainable, input_grads):
        # A parameter no head reached (every scale 0) gets zeros, as a plain backward of 0 * loss
        # would give, so optimizers and ZeRO see a gradient for every parameter.
        grads[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    weight_grad = None if weight_grad is None else weight_grad.to(weight.dtype)
    return torch.stack(losses), [grads[0], weight_grad, *grads[1:]]


def _losses_only(plan: _Plan, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: per-head losses, no gradient work at all."""
    weight = plan.stack.weight
    losses = [
        _head_loss(plan, k, plan.stack.norm(hidden), weight, None, want_grad=False)[0]
        for k, hidden in enumerate(plan.stack.hidden_states(z))
    ]
    head_losses = torch.stack(losses)  # [n]
    return (head_losses * head_losses.new_tensor(list(plan.scales))).sum(), head_losses


def mtp_loss(
    z: torch.Tensor,
    targets: torch.Tensor,
    stack: HeadStack,
    scales: Sequence[float],
    chunk_tokens: int,
    cross_entropy: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_k scales[k] * (mean cross-entropy of head k), and the unscaled per-head means.

    z [s, b, d] is the trunk output, targets [n, s, b] the ids head k must
    predict (IGNORE_INDEX where none). Each head's mean is over its own
    valid tokens; a head without any has loss 0 and zero gradients.
    Under `torch.no_grad()` only the losses are computed. `cross_entropy`
    (default: ours, `fused_cross_entropy`) is another only where
    `mtp bench loss-memory` measures a library's.
    Returns (loss to backpropagate, head_losses [n] detached).
    """
    plan = _Plan(stack, targets, scales, chunk_tokens, cross_entropy or fused_cross_entropy)
    if not torch.is_grad_enabled():
        return _losses_only(plan, z)
    return _HeadByHeadLoss.apply(plan, z, stack.weight, *stack.params)

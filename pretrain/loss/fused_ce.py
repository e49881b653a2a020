"""Unembedding + cross-entropy fused and chunked over tokens, with hand-written gradients.

Logits are tokens x vocab, by far the largest tensor of a language model's
step (8192 tokens x 32000 x 4 bytes = 1 GiB per head). Here they exist only
one chunk of `chunk_tokens` rows at a time: each chunk's logits are turned
into its loss and, straight away, into its gradients for the hidden states
and the unembedding weight, then freed. No autograd graph is built, so
nothing of the chunk outlives the loop iteration.

The weight may be a vocab-parallel shard ([padded_vocab / tp, d]) as
megatron's `vocab_parallel_cross_entropy` uses it: the row max and the sum
of exponentials are all-reduced over the tensor-parallel group and the
target logit is contributed by the rank that holds it. At tp=1 there are no
collectives. megatron's own helpers are not reused because they force
float32, and the gradient checks run in float64.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility

IGNORE_INDEX = -100


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def _shard_range(shard_rows: int) -> tuple[int, int]:
    """Global vocabulary ids [start, end) this rank's weight shard covers."""
    return VocabUtility.vocab_range_from_per_partition_vocab_size(
        shard_rows,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _chunk_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss [c] and, for the gradient, probabilities [c, Vl] and target positions.

    Returns (loss, probs, local, cols): probs is the softmax over the whole
    (sharded) vocabulary restricted to this shard; `local` [c] marks the
    tokens whose target this shard holds, at column `cols` [c] (0 elsewhere).
    Masks instead of index lists keep the loop free of host syncs on GPUs.
    """
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    start, end = _shard_range(weight.shape[0])
    logits = (hidden @ weight.t()).to(acc_dtype)  # [c, Vl]
    if end > vocab_size:  # padding rows of the vocabulary can never be predicted
        logits[:, max(0, vocab_size - start) :] = float("-inf")
    row_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)  # [c]
    logits -= row_max[:, None]
    local = (targets >= start) & (targets < end)  # [c]
    cols = torch.where(local, targets - start, 0)  # [c]
    target_logit = torch.where(local, logits.gather(1, cols[:, None]).squeeze(1), 0.0)  # [c]
    target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM)
    probs = logits.exp_()  # [c, Vl], in place: the logits are no longer needed
    sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM)  # [c]
    loss = sum_exp.log() - target_logit  # [c]
    probs /= sum_exp[:, None]
    return loss, probs, local, cols


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight [Vl, d] += grad_logits.T [Vl, c] @ hidden [c, d], in place when dtypes allow."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    else:
        grad_weight += (grad_logits.t() @ hidden).to(grad_weight.dtype)


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_tokens: int,
    grad_scale: float | None = None,
    grad_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk.

    hidden [T, d] (already normalised), weight [Vl, d], targets [T] global
    ids with IGNORE_INDEX for tokens that carry no loss.
    With `grad_scale` set, also returns d(grad_scale * loss_sum)/d hidden
    [T, d] (whole, all-reduced over tensor-parallel ranks) and adds
    d(grad_scale * loss_sum)/d weight into `grad_weight` (if given).
    Returns (loss_sum scalar, grad_hidden or None).
    """
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    grad_hidden = None if grad_scale is None else torch.empty_like(hidden, dtype=acc_dtype)
    for begin in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[begin : begin + chunk_tokens]  # [c, d]
        t = targets[begin : begin + chunk_tokens]  # [c]
        valid = t != IGNORE_INDEX  # [c]
        loss, probs, local, cols = _chunk_log_probs(h, weight, t, vocab_size)
        loss_sum += torch.where(valid, loss, 0.0).sum()
        if grad_scale is None:
            continue
        # d loss / d logits = softmax - one_hot(target); the one-hot lives on the target's shard
        probs.scatter_add_(1, cols[:, None], -local.to(probs.dtype)[:, None])
        probs *= (valid.to(acc_dtype) * grad_scale)[:, None]
        grad_logits = probs.to(weight.dtype)  # [c, Vl]
        grad_hidden[begin : begin + chunk_tokens] = grad_logits @ weight  # [c, d]
        if grad_weight is not None:
            _add_weight_grad(grad_weight, grad_logits, h)
    if grad_hidden is not None:
        grad_hidden = _all_reduce(grad_hidden, dist.ReduceOp.SUM)
    return loss_sum, grad_hidden

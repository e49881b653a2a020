"""The straightforward MTP loss: every head's whole logits at once, one backward.

This is what the paper's Figure 2 improves on, kept as the reference the
gradient tests and `mtp bench loss-memory` compare the fused schedule
against. Its peak memory grows with n x tokens x vocab. tp=1 only.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from pretrain.loss.fused_ce import IGNORE_INDEX
from pretrain.loss.schedule import HeadStack


def naive_mtp_loss(
    z: torch.Tensor, targets: torch.Tensor, stack: HeadStack, scales: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `mtp_loss`, with the autograd graph of every head's logits kept."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("naive_mtp_loss is the tp=1 reference; use mtp_loss under tensor parallelism")
    acc_dtype = torch.promote_types(stack.weight.dtype, torch.float32)
    losses = []
    for k, hidden in enumerate(stack.hidden_states(z)):
        logits = stack.norm(hidden) @ stack.weight.t()  # [s, b, padded_vocab]
        logits = logits[..., : stack.vocab_size].reshape(-1, stack.vocab_size).to(acc_dtype)  # [s * b, V]
        tokens = targets[k].reshape(-1)  # [s * b]
        n_valid = (tokens != IGNORE_INDEX).sum().clamp(min=1).to(acc_dtype)
        losses.append(F.cross_entropy(logits, tokens, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid)
    head_losses = torch.stack(losses)  # [n]
    return (head_losses * head_losses.new_tensor(list(scales))).sum(), head_losses.detach()

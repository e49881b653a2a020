"""Whole ("logical") tensors and this rank's tensor-parallel slices of them, both ways.

A logical tensor is a weight as a one-process model with the real
vocabulary holds it: unsharded, vocabulary rows = `vocab_size`. A rank
holds a slice: vocabulary rows padded to a multiple of 128 x tp
(`ModelConfig.padded_vocab`), then cut along megatron's partition
dimension in its stride pattern (`linear_fc1` of a gated MLP holds
[gate_r; up_r], stride 2). Initialisation, resharding across layouts,
export and import all go through these functions, so every path agrees
on the cut.
"""

import torch
from megatron.core import parallel_state

VOCAB_PARAMS = ("embedding.embed.weight", "unembedding.output.weight")  # rows = padded vocabulary


def unshard(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Whole tensor from tensor-parallel shards; rank r holds stride-chunks r, r + tp, ... (megatron's split)."""
    chunks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([chunks[r][k] for k in range(stride) for r in range(len(parts))], dim)


def shard(whole: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of `whole`, as megatron's `_initialize_affine_weight_cpu` cuts the master weight."""
    chunks = whole.chunk(size * stride, dim)
    return torch.cat(chunks[rank::size], dim)


def pad_rows(whole: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to a padded vocabulary (padding ids are never predicted nor embedded)."""
    if whole.shape[0] == rows:
        return whole
    return torch.cat([whole, whole.new_zeros(rows - whole.shape[0], *whole.shape[1:])])


def is_split(param: torch.nn.Parameter) -> bool:
    """Whether megatron split this parameter over the tensor-parallel ranks."""
    return bool(getattr(param, "tensor_model_parallel", False)) and parallel_state.get_tensor_model_parallel_world_size() > 1


def logical_shape(name: str, param: torch.nn.Parameter, vocab_size: int) -> tuple[int, ...]:
    """Shape of the whole, unpadded tensor of which `param` is this rank's slice."""
    shape = list(param.shape)
    if is_split(param):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    if name in VOCAB_PARAMS:
        shape[0] = vocab_size
    return tuple(shape)


def local_slice(name: str, whole: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The logical tensor `whole` padded for this layout's vocabulary and cut to `param`'s slice."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    split = is_split(param)
    if name in VOCAB_PARAMS:
        whole = pad_rows(whole, param.shape[0] * (tp if split else 1))
    if split:
        whole = shard(whole, param.partition_dim, param.partition_stride,
                      parallel_state.get_tensor_model_parallel_rank(), tp)
    return whole

"""Initial weights that depend on the seed and the parameter's name only, never on the layout.

Each parameter's logical tensor (whole, vocabulary unpadded; see
`sharding`) is drawn from its own CPU generator, seeded by (seed, MTPModel
name), and this rank keeps its slice: padding rows are zero and every
tensor-parallel rank cuts the same tensor. So a seed gives the same model
at any tp, pp, vocabulary padding and ZeRO stage, on a CPU or a GPU (the
CPU generator is the same everywhere), and a pipeline stage needs no other
stage's modules to get its own weights right.

The distributions are megatron's: normal(0, init_std) for matrices and the
embedding, init_std / sqrt(2 * residual depth) for the projections that
write into the residual stream (attention output, MLP down projection),
ones for norm gains. megatron's own initialisation is switched off
(`megatron_config.transformer_config`): it draws from a stream whose order
depends on the layout.
"""

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from pretrain.model.config import ModelConfig
from pretrain.model.sharding import local_slice, logical_shape

RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed of its own for every (seed, parameter name)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def logical_init(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int, depth: int) -> torch.Tensor:
    """The whole float32 initial value of parameter `name`."""
    if len(shape) == 1:
        return torch.ones(shape)  # RMSNorm gains (the model has no biases)
    std = cfg.init_std / math.sqrt(2.0 * depth) if name.endswith(RESIDUAL_OUTPUTS) else cfg.init_std
    generator = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def initialize(named: Iterable[tuple[str, torch.nn.Parameter]], cfg: ModelConfig, seed: int, depth: int,
               pretrained: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill every (MTPModel name, local parameter) with this rank's slice of its logical initial value.

    `pretrained` (logical tensors by name, e.g. a Hugging Face Llama's:
    `pretrain.hf.load.pretrained_state`) gives the value of every name it
    holds; the others are drawn from the seed.
    """
    for name, param in named:
        if pretrained is not None and name in pretrained:
            whole = pretrained[name]
        else:
            whole = logical_init(cfg, name, logical_shape(name, param, cfg.vocab_size), seed, depth)
        param.copy_(local_slice(name, whole, param))

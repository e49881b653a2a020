"""Building blocks from megatron-core: the decoder layer spec and parallel projections.

Everything tensor-parallel comes from megatron so that one code path serves
tp=1 on a laptop and tp=8 on a node: `ColumnParallelLinear`/`RowParallelLinear`
split the matmuls, megatron's `TransformerLayer` wires norm, attention, MLP
and residuals. Only the core attention (`SDPAttention`) is ours.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from pretrain.model.attention import SDPAttention


def decoder_layer_spec() -> ModuleSpec:
    """Pre-norm Llama layer: RMSNorm, causal self-attention, RMSNorm, SwiGLU MLP.

    The norm is torch's RMSNorm (`RMSNorm` below): it runs without
    Transformer Engine or apex, which a CPU box does not have.
    """
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def build_layer(tcfg: TransformerConfig, layer_number: int) -> TransformerLayer:
    """One decoder layer; `layer_number` is 1-based over the whole model."""
    return build_module(decoder_layer_spec(), config=tcfg, layer_number=layer_number)


class _SumGradOverTensorRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel group, in float32."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.float()  # [d]: a bf16 sum of partial gradients would round once more per rank
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        return total.to(grad.dtype)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm (what megatron's `WrappedTorchNorm` builds), also right under sequence parallelism.

    With the sequence split over the tensor-parallel ranks, each rank's
    gradient of the gain covers its own tokens only; the whole gradient is
    the sum over ranks. megatron adds these up in its own data-parallel
    wrapper (`finalize_model_grads`), which a DeepSpeed engine does not run,
    so the sum happens in autograd: the gain passes through an identity
    whose backward all-reduces it (d numbers per norm) before any engine
    hook sees the gradient. Parameter names and values are torch's.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_megatron_options):
        super().__init__(hidden_size, eps=eps)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _SumGradOverTensorRanks.apply(self.weight) if self.sequence_parallel else self.weight
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)  # [..., d]


def rms_norm(tcfg: TransformerConfig) -> torch.nn.Module:
    """The same RMSNorm the layers use, for final and head-input norms."""
    return RMSNorm(tcfg, tcfg.hidden_size, eps=tcfg.layernorm_epsilon)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension over the tensor-parallel group; backward keeps this rank's slice.

    The same operation as megatron's `gather_from_tensor_model_parallel_region`,
    which allocates its output with `torch.cuda.current_device()` and so
    cannot run on a CPU. The gradient arriving here is identical on every
    rank (the gathered output is replicated), so slicing it is exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)  # [..., tp * x.shape[-1]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return grad.chunk(tp, dim=-1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Whole tensor from tensor-parallel shards split along the last dimension (no-op at tp=1)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return _GatherLastDim.apply(x)


class ParallelProjection(torch.nn.Module):
    """A bias-free linear map in -> out whose output is whole on every tensor-parallel rank.

    A `ColumnParallelLinear` (each rank holds out/tp rows of the weight)
    followed by an all-gather of the outputs, so the layer is one matrix
    (not two, as column-then-row would be) and stays correct under tensor
    parallelism.
    """

    def __init__(self, tcfg: TransformerConfig, in_features: int, out_features: int):
        super().__init__()
        self.linear = ColumnParallelLinear(
            in_features,
            out_features,
            config=tcfg,
            init_method=tcfg.init_method,
            bias=False,
            gather_output=False,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(x)  # [..., out / tp]
        return gather_last_dim(out)  # [..., out]

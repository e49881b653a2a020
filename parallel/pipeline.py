"""The MTP model as a DeepSpeed `PipelineModule`: embedding first, trunk split, heads + loss last.

Pipeline layers, in order (`parallel.topology.stage_parts` splits them):

    0          EmbeddingStage     (input_ids [b, s], labels) -> (hidden [s, b, d], labels)   always on stage 0
    1 .. L     TrunkLayerStage    (hidden, labels) -> (hidden [s, b, d], labels)            one TransformerLayer each
    L + 1      HeadsStage         (z [s, b, d], labels [b, n, s]) -> loss []                always on the last stage

Under sequence parallelism the hidden states are [s / tp, b, d], this tensor
rank's positions, so a stage boundary sends 1 / tp of the activations.

The last stage computes the loss in its forward: MTPModel's own
`head_loss` (the per-head forward/backward schedule with the fused,
vocab-parallel cross-entropy), so the labels travel with the activations
(a few KB per micro-batch beside megabytes of hidden states) and the
module's output is the loss. That is deliberate: DeepSpeed prepares the
backward (its bf16 optimizer clears the low-precision gradients) when the
backward reaches the module's output; were the heads' loss a `loss_fn`
applied after the module, their gradients would land before that moment
and be wiped, and the heads would never train under bf16. Batches are
`((input_ids, labels), labels)`: DeepSpeed gives the first part to stage 0
and the second to the last stage's `loss_fn`, which passes the loss on.

Weights: each rank builds only its own stage's modules and initialises them
by MTPModel name (`pretrain.model.init`), so a pipeline starts from the same
weights as a pp=1 run of the same seed, whatever the split, which is what
makes layouts comparable step for step.
"""

import contextlib
import sys
from collections.abc import Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallel.deepspeed_pipe import LayerSpec, PipelineModule
from parallel.topology import stage_parts
from pretrain.model.config import ModelConfig
from pretrain.model.heads import build_heads
from pretrain.model.init import initialize
from pretrain.model.layers import build_layer
from pretrain.model.megatron_config import residual_depth, transformer_config
from pretrain.model.mtp import MTPModel
from pretrain.model.rotary import rotary_angles
from pretrain.model.vocab import TokenEmbedding, Unembedding


class EmbeddingStage(torch.nn.Module):
    """Vocab-parallel token embedding, the first pipeline layer."""

    def __init__(self, tcfg, padded_vocab: int):
        super().__init__()
        self.embedding = TokenEmbedding(tcfg, padded_vocab)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = inputs
        return self.embedding(input_ids.t()), labels  # [b, s] -> [s, b, d]


class TrunkLayerStage(torch.nn.Module):
    """One trunk TransformerLayer; computes its own rotary angles so stages pass one tensor."""

    def __init__(self, cfg: ModelConfig, tcfg, layer_number: int, params_dtype: torch.dtype):
        super().__init__()
        self.layer = build_layer(tcfg, layer_number)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.theta = cfg.rope_theta
        self.angle_dtype = torch.float64 if params_dtype == torch.float64 else torch.float32

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, labels = inputs  # [s, b, d] ([s / tp, b, d] sequence-parallel), [b, n, s]
        rotary = rotary_angles(labels.shape[-1], self.head_dim, self.theta, hidden.device, dtype=self.angle_dtype)
        out, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=rotary)
        return out, labels  # [s, b, d]


class HeadsStage(torch.nn.Module):
    """The n heads and the shared unembedding; its forward is MTPModel's `head_loss` on them.

    MTPModel's methods are borrowed rather than copied, so the pipeline's last
    stage computes exactly what a one-process model computes. `step` (set by
    MTPPipeline) picks the head loss scales; every micro-batch's per-head
    losses are summed for logging (`reduce_head_losses`).
    """

    head_stack = MTPModel.head_stack
    head_loss = MTPModel.head_loss
    rotary = MTPModel.rotary
    embedding = None  # only sequential heads embed tokens, and they are refused with pp > 1

    def __init__(self, cfg: ModelConfig, tcfg, padded_vocab: int, params_dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.params_dtype = params_dtype
        self.sequence_parallel = tcfg.sequence_parallel
        self.heads = build_heads(cfg, tcfg)
        self.unembedding = Unembedding(tcfg, padded_vocab, cfg.vocab_size)
        self.step = 0
        self.micro_batches = 0
        self.sums: torch.Tensor | None = None  # [1 + n]: loss, head losses summed over micro-batches

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        z, labels = inputs
        loss, head_losses = self.head_loss(z, labels, self.step)
        values = torch.cat([loss.detach().reshape(1), head_losses.detach()]).float()  # [1 + n]
        self.sums = values if self.sums is None else self.sums + values
        self.micro_batches += 1
        return loss


def _stage_layers(cfg: ModelConfig, parts: list[int], stage: int, tcfg, params_dtype: torch.dtype,
                  device: torch.device) -> list:
    """This stage's modules, built on `device`; LayerSpec placeholders (never built) for other stages."""
    padded = cfg.padded_vocab(parallel_state.get_tensor_model_parallel_world_size())
    makers = [(EmbeddingStage, lambda: EmbeddingStage(tcfg, padded))]
    makers += [(TrunkLayerStage, lambda i=i: TrunkLayerStage(cfg, tcfg, i + 1, params_dtype))
               for i in range(cfg.trunk_layers)]
    makers.append((HeadsStage, lambda: HeadsStage(cfg, tcfg, padded, params_dtype)))
    first, stop = parts[stage], parts[stage + 1]
    layers = []
    for idx, (cls, make) in enumerate(makers):
        if not first <= idx < stop:
            layers.append(LayerSpec(cls))
            continue
        with torch.device(device) if device.type != "cuda" else contextlib.nullcontext():
            module = make()
        layers.append(module.to(device=device, dtype=params_dtype))
    return layers


class MTPPipeline(PipelineModule):
    """PipelineModule over the MTP model with our stage split and the per-head loss on the last stage.

    `step` (set by the trainer before each batch) picks the head loss scales.
    """

    def __init__(self, cfg: ModelConfig, topology, params_dtype: torch.dtype, device: torch.device,
                 seed: int, recompute: bool = False, layers_per_stage: list[int] | None = None,
                 pretrained: Mapping[str, torch.Tensor] | None = None, sequence_parallel: bool = False):
        pp = topology.get_dim("pipe")
        parts = stage_parts(cfg, pp, layers_per_stage)
        stage = topology.get_coord(dist.get_rank()).pipe
        object.__setattr__(self, "_fixed_parts", parts)  # read by _partition_layers inside super().__init__
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tcfg = transformer_config(cfg, tp, params_dtype, on_gpu=device.type == "cuda",
                                  sequence_parallel=sequence_parallel)
        layers = _stage_layers(cfg, parts, stage, tcfg, params_dtype, device)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints the partition on stdout
            super().__init__(
                layers, topology=topology, partition_method="uniform",
                activation_checkpoint_interval=1 if recompute else 0,
                checkpointable_layers=[TrunkLayerStage.__name__],
            )
        self.cfg = cfg
        initialize(((name, p) for _, name, p in named_global_parameters(self)), cfg, seed, residual_depth(cfg),
                   pretrained)
        if self.heads_stage is not None:
            self.loss_fn = _pass_loss

    @property
    def heads_stage(self) -> HeadsStage | None:
        """The last stage's HeadsStage module (None on other stages)."""
        last = self.forward_funcs[-1] if self.forward_funcs else None
        return last if isinstance(last, HeadsStage) else None

    @property
    def step(self) -> int:
        return self.heads_stage.step if self.heads_stage is not None else 0

    @step.setter
    def step(self, value: int) -> None:
        if self.heads_stage is not None:
            self.heads_stage.step = value

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's hook for the split; ours weighs the head block as n layers (topology.stage_parts)."""
        self.parts = list(self._fixed_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])



def _pass_loss(loss: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    """The last stage's output already is the loss (see the module docstring)."""
    return loss


def reduce_head_losses(pipe: MTPPipeline, dp_size: int, device: torch.device) -> torch.Tensor:
    """[loss, head 1 .. head n] of the last batch, mean over micro-batches and data-parallel ranks, on every rank.

    Only last-stage ranks of tensor rank 0 hold sums; one all-reduce over the
    world brings them to rank 0 (on stage 0), which logs them. The result
    stays on `device`: reading it is the caller's one host synchronisation.
    """
    values = torch.zeros(1 + pipe.cfg.n_future, device=device)
    heads = pipe.heads_stage
    if heads is not None and heads.sums is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        values = heads.sums / heads.micro_batches
    if heads is not None:
        heads.sums, heads.micro_batches = None, 0
    dist.all_reduce(values)
    return values / dp_size


def global_name(local: str, trunk_layers: int) -> str:
    """MTPModel's name of a pipeline parameter: '3.layer.x' -> 'layers.2.x', '0.embedding.x' -> 'embedding.x'."""
    index, _, rest = local.partition(".")
    if 1 <= int(index) <= trunk_layers:
        return f"layers.{int(index) - 1}.{rest.removeprefix('layer.')}"
    return rest


def named_global_parameters(module: torch.nn.Module) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(engine-module name, MTPModel name, parameter) of every local parameter."""
    if isinstance(module, MTPPipeline):
        trunk = module.cfg.trunk_layers
        return [(name, global_name(name, trunk), p) for name, p in module.named_parameters()]
    return [(name, name, p) for name, p in module.named_parameters()]

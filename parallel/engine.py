"""Turn a model description and the runtime into a DeepSpeed engine.

The trainer never touches DeepSpeed directly: `parallel.steps` asks this
module for a model and an engine and drives them. pp=1 gives an `MTPModel`
under DeepSpeed's engine; pp>1 an `MTPPipeline` under its pipeline engine.
Both use DeepSpeed's process grid (`parallel.topology`), so gradients are
averaged over data-parallel peers only.

Precision (`parallel.dtype=bfloat16`): parameters and activations are
bf16; DeepSpeed's ZeRO/bf16 optimizers keep fp32 master weights and Adam
moments, accumulate gradients over micro-batches in fp32 and reduce them
over data-parallel ranks in fp32 (see `deepspeed_config`).
"""

import contextlib
import functools
import math
import sys
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.runtime import Runtime
from parallel.topology import check_groups_agree, deepspeed_grid, deepspeed_topology
from pretrain.config import RunConfig

__all__ = ["build_engine", "build_model", "deepspeed_config"]

# Elements per ZeRO reduce / all-gather bucket: 2e8 (0.8 GB at fp32) keeps NCCL messages large enough
# for link bandwidth, while overlap_comm's double buffering (about 4.5 x the bucket) stays a few GB.
BUCKET_ELEMENTS = 200_000_000


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' gains and biases stay undecayed, as in Llama and GPT recipes."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def own_clipping(cfg: RunConfig) -> bool:
    """Whether we, not DeepSpeed, compute the gradient norm and clip (ZeRO stage 0 in float32).

    DeepSpeed's float32 stage-0 path counts a replicated parameter only on the
    first rank of the whole tensor x pipeline group, so the norms of
    replicated weights on later pipeline stages (the heads' RMSNorm gains,
    the final norm) are dropped, and it does not keep the value. ZeRO and the
    bf16 optimizer count them per tensor-parallel rank, which is right.
    """
    return cfg.parallel.zero_stage == 0 and cfg.parallel.dtype == "float32"


def deepspeed_config(cfg: RunConfig, dp_size: int, pipelined: bool) -> dict:
    """DeepSpeed's config for this run; every setting that differs from DeepSpeed's default says why."""
    train = cfg.train
    bf16 = cfg.parallel.dtype == "bfloat16"
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // (train.micro_batch_size * dp_size),
        "gradient_clipping": 0.0 if own_clipping(cfg) else cfg.optimizer.grad_clip,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},  # NaN/inf skips the step
        # Sum micro-batch gradients and reduce them over data-parallel ranks in fp32: bf16 sums drop
        # the low bits of small gradients after a few additions (DeepSpeed's default is the model dtype).
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "zero_optimization": _zero_config(cfg.parallel.zero_stage, pipelined),
        "pipeline": _pipeline_config(cfg.parallel.sequence_parallel),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _pipeline_config(sequence_parallel: bool) -> dict:
    """DeepSpeed's pipeline settings.

    Recompute with torch-style checkpointing (int inputs allowed). DeepSpeed
    cuts a stage's output into tensor-rank slices, sends one slice from each
    rank and all-gathers them behind the boundary, which assumes every
    tensor rank holds the same activations; under sequence parallelism each
    already holds its own positions, so each sends its slice whole (the
    same bytes) and nothing is re-gathered.
    """
    partitioned = not sequence_parallel
    return {"use_reentrant": False, "pipe_partitioned": partitioned, "grad_partitioned": partitioned}


def _zero_config(stage: int, pipelined: bool) -> dict:
    return {
        "stage": stage,
        # Reduce each gradient bucket while the backward pass goes on. DeepSpeed's pipeline schedule
        # reduces after the last micro-batch and would switch it off with a warning: say so here.
        "overlap_comm": not pipelined,
        "contiguous_gradients": True,  # reduced gradients go into one flat buffer: no fragmentation
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_bucket_size": BUCKET_ELEMENTS,
    }


def build_model(cfg: RunConfig, runtime: Runtime, pretrained: Mapping[str, torch.Tensor] | None = None
                ) -> torch.nn.Module:
    """The model of `cfg` for this rank: MTPModel when pp=1, this rank's MTPPipeline stage otherwise.

    Weights are created on the runtime's device in its dtype and drawn from
    `train.seed` by parameter name, so every layout starts from the same
    model; `pretrained` logical tensors (a fresh run's `model.init_from`)
    take the place of the draw for the names they hold.
    """
    p = cfg.parallel
    if p.pp == 1:
        from pretrain.model.mtp import MTPModel

        model = MTPModel(cfg.model, params_dtype=runtime.dtype, device=runtime.device, seed=cfg.train.seed,
                         pretrained=pretrained, sequence_parallel=p.sequence_parallel)
        if p.recompute:
            recompute_trunk(model)
        return model
    from parallel.pipeline import MTPPipeline

    return MTPPipeline(cfg.model, deepspeed_topology(p.tp, p.pp, runtime.place.dp_size), runtime.dtype,
                       runtime.device, cfg.train.seed, recompute=p.recompute, layers_per_stage=p.layers_per_stage,
                       pretrained=pretrained, sequence_parallel=p.sequence_parallel)


def recompute_trunk(model: torch.nn.Module) -> None:
    """Keep only each trunk layer's input and recompute its activations in backward.

    torch's non-reentrant checkpoint rather than megatron's (which forks the
    CUDA RNG tracker): the model has no dropout, and this runs on CPUs too.
    The layer's forward is wrapped in place so parameter names stay as they are.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_engine(model: torch.nn.Module, cfg: RunConfig, runtime: Runtime):
    """A DeepSpeed engine with AdamW and the warm-up + cosine schedule.

    The optimizer is a plain torch AdamW handed to DeepSpeed, so the same
    code runs on CPU (where DeepSpeed's fused Adam cannot be built) and GPU.
    A pipeline module brings its own process grid; a pp=1 model gets one
    here. Either way megatron's groups are checked against it.
    `engine.mtp_clip` is our gradient clipping where DeepSpeed's own is
    wrong (`own_clipping`), else None.
    """
    place = runtime.place
    import deepspeed

    from parallel.pipeline import MTPPipeline

    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cfg.schedule.lr_factor(step, cfg.train.max_steps)
    )
    pipelined = isinstance(model, MTPPipeline)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its topology and settings on stdout
        grid = model.mpu() if pipelined else deepspeed_grid(cfg.parallel.tp, 1, place.dp_size)
        check_groups_agree(grid)
        if cfg.parallel.zero_stage == 3:  # the loss reads these outside their modules' calls (see LossScope)
            for param in model.loss_params():
                deepspeed.zero.register_external_parameter(model.loss_scope, param)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, place.dp_size, pipelined), mpu=None if pipelined else grid,
        )
    engine.mtp_clip = GradClip(list(model.parameters()), opt.grad_clip, grid) if own_clipping(cfg) else None
    apply_collective_timeout(cfg.fault.collective_timeout_s)
    return engine


def apply_collective_timeout(seconds: int) -> None:
    """Give every process group the run's collective timeout.

    `init_process_group` takes it for the world group only; the groups
    megatron and DeepSpeed create with `new_group` get the backend's default
    (30 minutes on gloo, 10 on NCCL), so a hung peer would stall a gradient
    all-reduce that long. torch has no public setter for an existing group.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        if group is not None and not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


class GradClip:
    """Global gradient norm and clipping, run by the optimizer just before it steps.

    Each replicated parameter counts once (on tensor rank 0 of its stage), each
    tensor-parallel shard on its own rank; the squares are summed over the
    model's tensor x pipeline group. Gradients are already averaged over
    data-parallel ranks when the optimizer steps. The clip factor is
    DeepSpeed's, max_norm / (norm + 1e-6), capped at 1.

    A NaN/inf norm skips the step as DeepSpeed's ZeRO optimizers do: every
    gradient is dropped (AdamW leaves a parameter without one untouched,
    moments and step count included) and `optimizer.overflow` tells the
    engine to count a skipped step and hold the learning-rate schedule. The
    norm is reduced over tensor x pipeline ranks of already dp-averaged
    gradients, so every rank of the job takes the same decision.
    """

    def __init__(self, params: list[torch.nn.Parameter], max_norm: float, grid):
        self.params = params
        self.max_norm = max_norm
        self.group = grid.get_model_parallel_group()
        self.tp_rank = grid.get_slice_parallel_rank()
        self.value = float("nan")

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.params
                 if p.grad is not None and (self.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
        device = self.params[0].device
        square = torch.zeros((), dtype=torch.float64, device=device)
        for grad in grads:  # a norm per tensor (no copy of the gradient), summed in float64
            square += torch.linalg.vector_norm(grad.detach()).double() ** 2
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(square, group=self.group)
        self.value = math.sqrt(float(square))
        optimizer.overflow = not math.isfinite(self.value)
        if optimizer.overflow:
            for p in self.params:
                p.grad = None
            return
        factor = self.max_norm / (self.value + 1e-6)
        if 0 < factor < 1:  # max_norm 0 turns clipping off
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor)


def grad_norm(engine) -> float | torch.Tensor:
    """Global gradient norm (before clipping) of the step just taken, as the optimizer keeps it.

    DeepSpeed's bf16 optimizer keeps a device tensor: it is left unread here
    (reading it is a host synchronisation) until the step is logged.
    """
    if engine.mtp_clip is not None:
        return engine.mtp_clip.value
    value = engine.get_global_grad_norm()
    return value if value is not None else float("nan")

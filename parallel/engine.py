"""Turn a model and a run config into a DeepSpeed engine.

The trainer never touches DeepSpeed directly: it asks this module for a
model and an engine, feeds it batches and reads back losses. pp=1 gives an
`MTPModel` under DeepSpeed's engine; pp>1 an `MTPPipeline` under its
pipeline engine. Both use DeepSpeed's process grid (`parallel.topology`), so
gradients are averaged over data-parallel peers only.
"""

import contextlib
import functools
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.topology import Place, check_groups_agree, deepspeed_grid, deepspeed_topology, place_of
from pretrain.config import RunConfig

__all__ = ["Place", "build_engine", "build_model", "grad_norm", "init_distributed"]


def init_distributed(cfg: RunConfig) -> Place:
    """Join (or, for a plain `python` run, create) the process group and megatron's groups.

    torchrun sets RANK/WORLD_SIZE/MASTER_*; without it we are a group of one
    on loopback so the same code path runs everywhere.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed announces its CPU shared-memory op on stdout; keep stdout for our own output (--json).
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(
            dist_backend=backend, verbose=False, timeout=timedelta(seconds=cfg.fault.collective_timeout_s)
        )
    from parallel.megatron_setup import init_model_parallel

    init_model_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return place_of(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]),
                    cfg.parallel.tp, cfg.parallel.pp)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    train = cfg.train
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // (train.micro_batch_size * dp_size),
        "gradient_clipping": 0.0 if own_clipping(cfg) else cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.parallel.dtype == "bfloat16", "check_grad_overflow": True},  # NaN/inf skips the step
        "pipeline": {"use_reentrant": False},  # recompute with torch-style checkpointing (int inputs allowed)
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_model(cfg: RunConfig, place: Place) -> torch.nn.Module:
    """The model of `cfg` for this rank: MTPModel when pp=1, this rank's MTPPipeline stage otherwise.

    Both draw the same initial weights for the same `train.seed` (see
    parallel/pipeline.py), so a run's layout does not change its start.
    """
    from parallel.megatron_setup import seed_everything

    seed_everything(cfg.train.seed)
    p = cfg.parallel
    if p.pp == 1:
        from pretrain.model.mtp import MTPModel

        model = MTPModel(cfg.model)
        if p.recompute:
            recompute_trunk(model)
        return model
    from parallel.pipeline import MTPPipeline

    return MTPPipeline(cfg.model, deepspeed_topology(p.tp, p.pp, place.dp_size), recompute=p.recompute,
                       layers_per_stage=p.layers_per_stage)


def recompute_trunk(model: torch.nn.Module) -> None:
    """Keep only each trunk layer's input and recompute its activations in backward.

    torch's non-reentrant checkpoint rather than megatron's (which forks the
    CUDA RNG tracker): the model has no dropout, and this runs on CPUs too.
    The layer's forward is wrapped in place so parameter names stay as they are.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_engine(model: torch.nn.Module, cfg: RunConfig, place: Place):
    """A DeepSpeed engine with AdamW and the warm-up + cosine schedule.

    The optimizer is a plain torch AdamW handed to DeepSpeed, so the same
    code runs on CPU (where DeepSpeed's fused Adam cannot be built) and GPU.
    A pipeline module brings its own process grid; a pp=1 model gets one
    here. Either way megatron's groups are checked against it.
    """
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
            config=deepspeed_config(cfg, place.dp_size), mpu=None if pipelined else grid,
        )
    engine.mtp_clip = None
    if own_clipping(cfg):
        engine.mtp_clip = GradClip(list(model.parameters()), opt.grad_clip, grid)
        engine.optimizer.register_step_pre_hook(engine.mtp_clip)
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

    def __call__(self, optimizer, _args, _kwargs) -> None:
        grads = [p.grad for p in self.params
                 if p.grad is not None and (self.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
        device = grads[0].device if grads else ("cuda" if torch.cuda.is_available() else "cpu")
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


def grad_norm(engine) -> float:
    """Global gradient norm (before clipping) of the step just taken."""
    if engine.mtp_clip is not None:
        return engine.mtp_clip.value
    value = engine.get_global_grad_norm()
    return float(value) if value is not None else float("nan")

"""Turn a model and a run config into a DeepSpeed engine.

The trainer never touches DeepSpeed directly: it asks this module for an
engine, feeds it micro-batches and reads back losses. Tensor and pipeline
parallelism extend this file, not the trainer.
"""

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from pretrain.config import RunConfig


@dataclass
class Place:
    """Where this process sits. Ranks are ordered tensor-fastest, then data, then pipeline."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int


def init_distributed(cfg: RunConfig) -> Place:
    """Join (or, for a plain `python` run, create) the process group.

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
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp_size = world // (tp * pp)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return Place(rank, world, int(os.environ["LOCAL_RANK"]), (rank // tp) % dp_size, dp_size)


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


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    train = cfg.train
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // (train.micro_batch_size * dp_size),
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.parallel.dtype == "bfloat16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig, place: Place):
    """A DeepSpeed engine with AdamW and the warm-up + cosine schedule.

    The optimizer is a plain torch AdamW handed to DeepSpeed, so the same
    code runs on CPU (where DeepSpeed's fused Adam cannot be built) and GPU.
    """
    import deepspeed

    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cfg.schedule.lr_factor(step, cfg.train.max_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, place.dp_size),
    )
    return engine


def grad_norm(engine) -> float:
    """Global gradient norm of the step just taken.

    ZeRO optimizers record it; without ZeRO DeepSpeed clips but drops the
    value, so the trainer calls `unclipped_grad_norm` before stepping.
    """
    value = engine.get_global_grad_norm()
    return float(value) if value is not None else float("nan")


def unclipped_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm over all local gradients (tensor-parallel size 1)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

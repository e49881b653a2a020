"""One ZeRO-3 backward against a plain one-process model's, parameter by parameter.

Run by tests/distributed/test_zero3.py as

    torchrun --nproc-per-node K tests/distributed/zero3_grads_worker.py OUT.json KEY=VALUE ...

Every rank builds the model twice from the same seed: one under a ZeRO-3
engine with every weight partitioned, one plain. The engine takes this
data-parallel rank's half of a batch through forward and backward; the
plain model backpropagates the whole batch (each rank's half, divided by
dp, as ZeRO averages). Rank 0 writes, for every parameter, the relative
difference of DeepSpeed's full gradient (`safe_get_full_grad`) from the
plain one, and the same for the per-head losses.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from layout_worker import zero_settings

IGNORE_INDEX = -100


def batch(cfg, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows as the loader cuts them: input_ids [rows, s], labels [rows, n, s], a few ignored."""
    s, n = cfg.train.seq_len, cfg.model.n_future
    windows = torch.randint(0, cfg.model.vocab_size, (rows, s + n), generator=torch.Generator().manual_seed(7))
    labels = torch.stack([windows[:, k + 1 : k + 1 + s] for k in range(n)], dim=1)  # [rows, n, s]
    labels[:, :, -3:] = IGNORE_INDEX  # as at the end of a document
    return windows[:, :s], labels


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def main(out: str, overrides: list[str]) -> None:
    from parallel.engine import build_engine, build_model
    from parallel.runtime import start
    from pretrain.config import load_config

    cfg = load_config("configs/tiny-cpu.yaml", [*overrides, "parallel.zero_stage=3"])
    runtime = start(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dtype, cfg.fault.collective_timeout_s)
    place = runtime.place
    plain = build_model(cfg, runtime)
    model = build_model(cfg, runtime)
    zero_settings({"stage3_param_persistence_threshold": 0})
    engine = build_engine(model, cfg, runtime)
    from deepspeed.utils import safe_get_full_grad  # after the runtime fixed DeepSpeed's accelerator

    partitioned = all(p.numel() == 0 for p in model.parameters())

    rows = cfg.train.micro_batch_size
    input_ids, labels = batch(cfg, rows * place.dp_size)
    mine = slice(place.dp_rank * rows, (place.dp_rank + 1) * rows)
    loss, head_losses = engine(input_ids[mine], labels[mine])
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in model.named_parameters()}

    for r in range(place.dp_size):
        part = slice(r * rows, (r + 1) * rows)
        (plain(input_ids[part], labels[part])[0] / place.dp_size).backward()
    with torch.no_grad():
        plain_heads = plain(input_ids[mine], labels[mine])[1]
    result = {
        "partitioned": partitioned,
        "grads": {name: relative(grads[name], p.grad) for name, p in plain.named_parameters()},
        "head_losses": relative(head_losses.detach(), plain_heads),
    }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

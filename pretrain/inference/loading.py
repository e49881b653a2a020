"""A model and its tokenizer for generation: from an exported file or straight from a run's checkpoint.

An exported file (`mtp export`) is the normal input. A run directory, its
`checkpoints/` directory or one `step_*` directory also works: the newest
complete checkpoint is consolidated in memory exactly as `mtp export` would
write it, so a model can be tried while it trains without writing a file.
"""

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from pretrain.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def quiet_megatron():
    """Silence megatron's warnings while it is imported and a model is built.

    It warns that Transformer Engine and apex are missing and about CUDA-graph
    defaults; none of that concerns generation, and completions printed by
    `mtp generate` should not drown in it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"megatron\.")
        yield


def pick_device(dtype: str) -> torch.device:
    """This process's device as the runtime decides it (a GPU when there is one, else the CPU).

    bfloat16 runs on either; on a CPU it is slow and only worth it to check
    what a bf16 model does.
    """
    from parallel.runtime import local_decision

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    return torch.device(local_decision().device)


def load_model(path: str, dtype: str = "float32"):
    """(model in eval mode on the chosen device, tokenizer, ModelConfig) from a file or a run/checkpoint dir."""
    device = pick_device(dtype)
    source = Path(path)
    if not source.exists():
        raise UserError(f"--model {path} does not exist; pass a file written by `mtp export` or a run directory")
    if source.is_dir():
        model, tokenizer, cfg = _from_checkpoint(path)
    else:
        from pretrain.export import load_exported

        model, tokenizer, cfg = load_exported(path)
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), tokenizer, cfg


def _from_checkpoint(path: str):
    """Build the model from the newest complete checkpoint under `path`, consolidated in memory."""
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain import checkpoint as ckpt
    from pretrain.export import consolidated_state_dict, model_with_weights, resolve_checkpoint
    from pretrain.model.config import ModelConfig

    step_dir = resolve_checkpoint(path)
    cfg = ModelConfig(**json.loads((step_dir / ckpt.EXTRA).read_text())["model"])
    tokenizer = load_tokenizer(str(step_dir / "tokenizer"))
    model = model_with_weights(cfg, consolidated_state_dict(step_dir, cfg), source=str(step_dir))
    return model, tokenizer, cfg

"""Process groups for megatron-core, usable from a single CPU process.

megatron-core's layers look up their tensor-parallel group in
`parallel_state`, so that state must exist before any model is built, even
for one process on a laptop. `init_model_parallel` creates it (starting a
one-process gloo group if nobody started `torch.distributed` yet) and is
idempotent, so tests, tools and the trainer can all call it.
"""

import os
import socket

import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.errors import UserError


def _free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_single_process_group() -> None:
    """A world of one: gloo works everywhere, and one rank needs no NCCL."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)


def init_model_parallel(tp: int = 1, pp: int = 1) -> None:
    """Make megatron's tensor/pipeline groups exist (tp x pp ranks per model replica).

    Calling it again with the same sizes does nothing; different sizes in the
    same process are a programming error megatron cannot recover from.
    """
    if not dist.is_initialized():
        if tp * pp != 1:
            raise UserError(
                f"tp={tp} x pp={pp} needs {tp * pp} processes but torch.distributed is not started; "
                "launch with torchrun (or srun) so every rank joins the process group"
            )
        _start_single_process_group()
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (tp, pp):
            raise RuntimeError(f"model parallel groups already exist with (tp, pp)={have}, asked for {(tp, pp)}")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )

"""The runtime, decided once at start-up: device, backend, DeepSpeed's accelerator, dtype, coordinates.

Everything that depends on the machine is answered here, before any
process group exists, and handed on as one `Runtime`: to model building
(where weights live, in which dtype), the engine (DeepSpeed's accelerator
and config), the loader (which data-parallel replica) and the trainer. No
other module asks torch about devices.

The order matters on GPUs:
1. DeepSpeed's accelerator is fixed in the environment before DeepSpeed is
   imported: it decides on import, once, and a CPU accelerator beside CUDA
   tensors fails far from the cause.
2. `torch.cuda.set_device(LOCAL_RANK)` before any collective, so NCCL's
   communicators, barriers and megatron's groups bind to this rank's GPU.
3. `init_process_group(..., device_id=...)` so NCCL connects eagerly on that
   device; DeepSpeed and megatron then build on the existing group.

`decide` is a pure function of the environment and the number of visible
GPUs, so every combination (and every contradiction) is testable on a CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from parallel.kernels import resolve as resolve_kernels
from parallel.topology import Place, place_of
from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

# DS_ACCELERATOR value -> (device type, process-group backend)
ACCELERATORS = {"cuda": ("cuda", "nccl"), "cpu": ("cpu", "gloo")}
DTYPE_NAMES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Decision:
    """Where this process runs, from LOCAL_RANK, DS_ACCELERATOR and the GPUs it can see."""

    device: str  # "cuda:<LOCAL_RANK>" or "cpu"
    backend: str  # "nccl" or "gloo"
    accelerator: str  # DeepSpeed's accelerator name, exported as DS_ACCELERATOR


def decide(env: Mapping[str, str], cuda_devices: int) -> Decision:
    """The device, backend and accelerator for a process with environment `env`.

    CUDA when GPUs are visible, else the CPU. An explicit DS_ACCELERATOR wins
    (DS_ACCELERATOR=cpu trains on the CPU of a GPU node); one that cannot be
    honoured, or a LOCAL_RANK with no GPU of its own, is a UserError.
    """
    local_rank = _local_rank(env)
    asked = env.get("DS_ACCELERATOR", "").strip()
    if asked and asked not in ACCELERATORS:
        raise UserError(f"DS_ACCELERATOR={asked} is not supported here; unset it, or set it to "
                        f"{' or '.join(ACCELERATORS)}")
    accelerator = asked or ("cuda" if cuda_devices > 0 else "cpu")
    device_type, backend = ACCELERATORS[accelerator]
    if device_type == "cpu":
        return Decision("cpu", backend, accelerator)
    if cuda_devices == 0:
        raise UserError("DS_ACCELERATOR=cuda but this process sees no CUDA GPU (check CUDA_VISIBLE_DEVICES and "
                        "the driver, or that torch is a CUDA build); unset DS_ACCELERATOR to train on the CPU")
    if local_rank >= cuda_devices:
        raise UserError(f"LOCAL_RANK={local_rank} but this node shows {cuda_devices} CUDA GPU(s); launch at most "
                        f"{cuda_devices} processes per node (torchrun --nproc-per-node={cuda_devices})")
    return Decision(f"cuda:{local_rank}", backend, accelerator)


def _local_rank(env: Mapping[str, str]) -> int:
    text = env.get("LOCAL_RANK", "0")
    if not text.isdigit():
        raise UserError(f"LOCAL_RANK={text!r} must be a non-negative integer (torchrun and srun set it)")
    return int(text)


@dataclass(frozen=True)
class Runtime:
    """The decision, applied: the device, backend and dtype of this process and where it sits."""

    device: torch.device
    backend: str
    dtype: torch.dtype  # parameters and activations; master weights and gradients are fp32 under bf16
    place: Place
    control_group: Any  # a gloo group for host-side agreements (stop signals) that must not sync the GPU
    kernels: str = "torch"  # the kernel set the layers are built with (parallel/kernels.py)

    @property
    def is_main(self) -> bool:
        return self.place.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def device_name(self) -> str:
        """'NVIDIA H100 80GB HBM3', or 'cpu': the key of the peak-FLOP/s table."""
        import torch

        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def to_device(self, batch: dict) -> dict:
        """A loader batch (CPU tensors) on this device; asynchronous from pinned memory on GPUs."""
        if not self.cuda:
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def peak_memory_bytes(self) -> int | None:
        """Peak memory since the last call, and start a new window: allocated on a GPU, resident on a CPU.

        On a GPU, torch's allocator peak (`max_memory_allocated`); on a Linux
        CPU, the process's resident high-water mark (VmHWM), reset through
        /proc/self/clear_refs. None where neither can be read.
        """
        import torch

        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        return _resident_peak_bytes()

    def synchronize(self) -> None:
        """Wait for queued GPU work (timings, memory readings); nothing to wait for on a CPU."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)


def _resident_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark restarts from the current resident size
    except (OSError, StopIteration, ValueError):
        return None
    return peak


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPE_NAMES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPE_NAMES)}")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def local_decision() -> Decision:
    """The decision for this process as it stands (LOCAL_RANK, DS_ACCELERATOR, visible GPUs)."""
    import torch

    return decide(os.environ, torch.cuda.device_count())


def start(tp: int, pp: int, dtype: str, collective_timeout_s: int, seed: int = 0, kernels: str = "auto",
          sequence_parallel: bool = False) -> Runtime:
    """Apply the decision and join the process group: the first thing a training process does.

    torchrun sets RANK/WORLD_SIZE/MASTER_*; without it the process is a
    group of one on loopback, so the same code path runs everywhere.
    """
    import torch
    import torch.distributed as dist

    if tp > 1:  # before any CUDA context: megatron's tensor-parallel overlap needs one hardware queue
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    decision = local_decision()
    fix_deepspeed_accelerator(decision.accelerator)
    device = torch.device(decision.device)
    chosen = resolve_kernels(kernels, device.type)  # before any group: a forced kernel that is missing fails fast
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif sequence_parallel:
        _megatron_buffers_on_the_cpu()
    _single_process_defaults()
    timeout = timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(decision.backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_backend() != decision.backend:
        raise RuntimeError(f"a {dist.get_backend()} process group exists, the runtime decided {decision.backend}")
    _deepspeed_joins(decision.backend, timeout)
    _megatron_joins(tp, pp, device, seed)
    control = dist.new_group(backend="gloo") if decision.backend != "gloo" else dist.group.WORLD
    place = place_of(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), tp, pp)
    return Runtime(device, decision.backend, torch_dtype(dtype), place, control, chosen)


def _megatron_buffers_on_the_cpu() -> None:
    """Let megatron-core's sequence-parallel code run in a CPU process, as it runs on GPUs.

    megatron allocates the buffers of its sequence-parallel all-gathers and
    reduce-scatters with `device=torch.cuda.current_device()`
    (tensor_parallel.mappings and layers, its GlobalMemoryBuffer), a call
    that raises in a CPU-only torch. A CPU process training with sequence
    parallelism answers it with the CPU, so the CPU suite runs megatron's
    own sequence-parallel layers under gloo, the code a GPU runs under NCCL.
    Nothing else in a CPU process calls it; GPU processes are untouched.
    """
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def export_deepspeed_accelerator() -> None:
    """For tools that use DeepSpeed's code without starting a runtime (export, generation, resharding):
    export this process's decision as DS_ACCELERATOR before DeepSpeed's first import, so it needs no
    guess (and prints no warning on stdout, where `--json` output goes)."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = local_decision().accelerator


def fix_deepspeed_accelerator(name: str) -> None:
    """Export DS_ACCELERATOR before DeepSpeed is imported; refuse if it was imported with another one."""
    os.environ["DS_ACCELERATOR"] = name
    accelerator_module = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(accelerator_module, "ds_accelerator", None)
    if chosen is not None and chosen._name != name:
        raise RuntimeError(f"DeepSpeed was imported with the {chosen._name} accelerator before the runtime "
                           f"decided {name}: import deepspeed only after parallel.runtime.start")


def _single_process_defaults() -> None:
    """Without a launcher (no WORLD_SIZE) the process is a group of one on a fresh loopback port."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_joins(backend: str, timeout: timedelta) -> None:
    """DeepSpeed's communication layer on the existing group (it creates none of its own)."""
    import deepspeed

    # DeepSpeed announces its CPU shared-memory op on stdout; keep stdout for our own output (--json).
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


def _megatron_joins(tp: int, pp: int, device: torch.device, seed: int) -> None:
    """megatron's tensor/pipeline groups; the generators seeded, megatron's CUDA RNG tracker included.

    megatron's layer constructors fork the tracker around weight
    initialisation when they allocate on a GPU, even though our
    initialisation method leaves the tensors for `pretrain.model.init` to
    fill; the tracker must therefore exist. Nothing in training draws from
    any of these: weights come from logical tensors seeded by name and the
    model has no dropout; they are seeded (and checkpointed) so that
    anything random added later is reproducible too.
    """
    import random

    import torch
    from megatron.core import tensor_parallel

    from parallel.megatron_setup import init_model_parallel

    init_model_parallel(tp=tp, pp=pp)
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

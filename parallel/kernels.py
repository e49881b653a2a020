"""Which kernels build the model's layers: `model.kernels` = auto | te | apex | torch.

`torch` is megatron-core's layers with torch's RMSNorm and our SDPA core
attention: it runs everywhere and is the reference the fused paths are held
to. `te` (Transformer Engine: fused RMSNorm + linear, flash/cuDNN attention)
and `apex` (fused RMSNorm, FusedAdam) are CUDA-only. A fused path is used
only once its gradient parity with `torch` and its speed have been measured
on a GPU (`make gpu-check`, docs/benchmarks.md); until a path is listed in
VALIDATED, `auto` takes `torch` and forcing it says so. Whatever kernels
train a model, checkpoints and `mtp export` keep one canonical layout.
"""

import importlib
from collections.abc import Callable

from pretrain.errors import UserError
from pretrain.model.config import KERNELS

VALIDATED = ("torch",)  # fused paths join with their GPU run (docs/benchmarks.md#gpu-check)
FASTEST_FIRST = ("te", "apex", "torch")
_MODULES = {"te": "transformer_engine.pytorch", "apex": "apex.normalization"}
_HOW_TO_GET = {
    "te": "use an NVIDIA NGC PyTorch image, or `pip install transformer-engine[pytorch]` on the CUDA machine",
    "apex": "use an NVIDIA NGC PyTorch image, or build apex from source with its CUDA extensions",
}


def import_problem(name: str) -> str | None:
    """Why kernel set `name` cannot be imported here, or None when it can (torch always can)."""
    module = _MODULES.get(name)
    return None if module is None else _import_failure(module)


def _import_failure(module: str) -> str | None:
    """'<module> does not import (<error>)', or None when it imports."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 -- a broken install fails in many ways; each is "unusable"
        return f"{module} does not import ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


# Fused linear + cross-entropy of other libraries, measured against ours (pretrain/loss/library_ce.py).
LIBRARIES = {"liger": "liger_kernel.transformers.fused_linear_cross_entropy", "cce": "cut_cross_entropy"}
_LIBRARY_NEEDS_CUDA = ("liger",)


def library_problem(name: str, device_type: str) -> str | None:
    """Why cross-entropy library `name` cannot run here (with how to get it), or None when it can."""
    if name in _LIBRARY_NEEDS_CUDA and device_type != "cuda":
        return f"{name} runs only on a CUDA GPU (its kernels are Triton's); leave it out on the {device_type}"
    why = _import_failure(LIBRARIES[name])
    return why and f"{why}; install it with `pip install -e .[gpu-kernels]` on the CUDA machine"


def resolve(requested: str, device_type: str, problem: Callable[[str], str | None] = import_problem) -> str:
    """The kernel set to build with; a forced one that cannot run here is a UserError naming the fix."""
    if requested not in KERNELS:
        raise UserError(f"model.kernels must be one of {', '.join(KERNELS)}, got '{requested}'")
    if requested == "auto":
        return next(k for k in FASTEST_FIRST if k in VALIDATED and _usable(k, device_type, problem))
    if requested == "torch":
        return "torch"
    if device_type != "cuda":
        raise UserError(f"model.kernels={requested} needs a CUDA GPU and this process runs on the {device_type}; "
                        "use model.kernels=auto or torch")
    why = problem(requested)
    if why:
        raise UserError(f"model.kernels={requested} but {why}: {_HOW_TO_GET[requested]}; or use model.kernels=auto")
    if requested not in VALIDATED:
        raise UserError(f"model.kernels={requested} imports here, but its path has not been validated against "
                        "the torch kernels on a GPU yet (make gpu-check, docs/benchmarks.md); use model.kernels=auto")
    return requested


def _usable(name: str, device_type: str, problem: Callable[[str], str | None]) -> bool:
    return name == "torch" or (device_type == "cuda" and problem(name) is None)

"""Kernel selection (`model.kernels`), the device peak table behind MFU, and the progress line's figures."""

import pytest

from parallel.hardware import peak_flops
from parallel.kernels import import_problem, resolve
from pretrain.errors import UserError
from pretrain.metrics import format_progress


def test_auto_picks_torch_on_this_machine():
    assert resolve("auto", "cpu") == "torch"
    assert resolve("torch", "cpu") == "torch"


def test_auto_ignores_importable_but_unvalidated_fused_kernels():
    """Even where TE and apex import on a GPU, auto stays on the validated torch path."""
    assert resolve("auto", "cuda", problem=lambda name: None) == "torch"


@pytest.mark.parametrize("kernels", ["te", "apex"])
def test_forcing_a_fused_kernel_here_is_one_line(kernels):
    with pytest.raises(UserError) as err:
        resolve(kernels, "cpu")
    assert f"model.kernels={kernels} needs a CUDA GPU" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kernels, hint", [("te", "transformer-engine[pytorch]"), ("apex", "apex from source")])
def test_a_missing_fused_library_names_how_to_get_it(kernels, hint):
    with pytest.raises(UserError) as err:
        resolve(kernels, "cuda", problem=lambda name: f"{name} does not import")
    assert hint in str(err.value) and "model.kernels=auto" in str(err.value)


def test_an_unvalidated_fused_kernel_says_so():
    with pytest.raises(UserError, match="has not been validated against the torch kernels on a GPU"):
        resolve("te", "cuda", problem=lambda name: None)


def test_transformer_engine_and_apex_are_not_installed_here():
    assert import_problem("te") is not None and import_problem("apex") is not None
    assert import_problem("torch") is None


def test_unknown_kernel_set():
    with pytest.raises(UserError, match="model.kernels must be one of auto, te, apex, torch"):
        resolve("triton", "cuda")


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),  # same chip, lower clocks: not the SXM's peak
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
    ("NVIDIA H100", "bfloat16", None),  # no prefix matching: an unknown name has no MFU rather than a wrong one
    ("cpu", "bfloat16", None),
    ("NVIDIA H200", "float16", None),
])
def test_peak_table_is_keyed_by_the_exact_device_name(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_progress_line_shows_mfu_memory_and_data_wait_when_known():
    line = format_progress(120, 2000, 2.9, [2.7, 2.9], 41_234.0, 720.0, mfu=0.482, memory_gb=61.24, data_share=0.013)
    assert line == "step 120/2000 | loss 2.90 | heads 2.70 2.90 | 41k tok/s | mfu 48% | mem 61.2G | data 1% | eta 12m"
    assert "mfu" not in format_progress(1, 2, 1.0, [1.0], 10.0, 1.0)

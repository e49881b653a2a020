"""liger-kernel's and cut-cross-entropy's fused linear + cross-entropy in the head-by-head schedule, on one GPU.

Marked `gpu` and skipped without CUDA or without the library
(`pip install -e .[gpu-kernels]`). On the same bf16 weights and batch as
`mtp bench loss-memory` builds, each library's per-head losses and every
gradient (z, heads, norm, unembedding) must match our fused loss within
bf16 tolerance: the parity half of the comparison that bench measures.
"""

import pytest
import torch

from parallel.kernels import library_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("library", ["liger", "cce"])
def test_library_matches_our_fused_loss_in_bf16(library):
    why = library_problem(library, "cuda")
    if why:
        pytest.skip(why)
    from parallel.megatron_setup import init_model_parallel
    from pretrain.bench.loss_memory import Case, _build, _gradients

    init_model_parallel()
    case = Case(impl=library, n_future=4, tokens=4096, seq_len=1024, vocab=32000, d_model=512,
                head_type="transformer", chunk_tokens=1024, device="cuda", repeats=1)
    model, z, labels = _build(case)
    ours_losses, ours = _gradients("fused", model, z, labels)
    lib_losses, lib = _gradients(library, model, z, labels)
    torch.testing.assert_close(lib_losses, ours_losses, rtol=2e-2, atol=2e-2)
    for name, grad in ours.items():
        scale = grad.abs().max()
        if scale == 0:  # the unused trunk layers
            continue
        assert (lib[name] - grad).abs().max() <= 2**-5 * scale, name

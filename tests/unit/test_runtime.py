"""The runtime decision: device, backend and DeepSpeed accelerator from the environment, and its errors."""

import subprocess
import sys

import pytest

from parallel.runtime import Decision, decide
from pretrain.errors import UserError


@pytest.mark.parametrize("env, gpus, want", [
    ({}, 0, Decision("cpu", "gloo", "cpu")),
    ({"LOCAL_RANK": "0"}, 8, Decision("cuda:0", "nccl", "cuda")),
    ({"LOCAL_RANK": "5"}, 8, Decision("cuda:5", "nccl", "cuda")),
    ({"LOCAL_RANK": "3", "DS_ACCELERATOR": "cuda"}, 4, Decision("cuda:3", "nccl", "cuda")),
    ({"LOCAL_RANK": "1", "DS_ACCELERATOR": "cpu"}, 8, Decision("cpu", "gloo", "cpu")),  # explicit wins
    ({"LOCAL_RANK": "7"}, 0, Decision("cpu", "gloo", "cpu")),  # a CPU node: every rank on the CPU
])
def test_decision(env, gpus, want):
    assert decide(env, gpus) == want


@pytest.mark.parametrize("env, gpus, fragment", [
    ({"DS_ACCELERATOR": "cuda"}, 0, "DS_ACCELERATOR=cuda but this process sees no CUDA GPU"),
    ({"DS_ACCELERATOR": "xpu"}, 0, "DS_ACCELERATOR=xpu is not supported"),
    ({"LOCAL_RANK": "8"}, 8, "LOCAL_RANK=8 but this node shows 8 CUDA GPU(s)"),
    ({"LOCAL_RANK": "-1"}, 2, "LOCAL_RANK='-1' must be a non-negative integer"),
    ({"LOCAL_RANK": "zero"}, 0, "LOCAL_RANK='zero'"),
])
def test_contradictions_are_one_line(env, gpus, fragment):
    with pytest.raises(UserError) as err:
        decide(env, gpus)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_imported_with_another_accelerator_is_refused():
    """DeepSpeed fixes its accelerator at import; the runtime must come first, and says so when it did not."""
    code = (
        "import os; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
        "import deepspeed\n"
        "from parallel.runtime import fix_deepspeed_accelerator\n"
        "fix_deepspeed_accelerator('cpu')\n"
        "try:\n"
        "    fix_deepspeed_accelerator('cuda')\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "refused: DeepSpeed was imported with the cpu accelerator before the runtime decided cuda" in out.stdout


def test_start_fixes_the_accelerator_before_deepspeed_and_joins_every_group():
    """One process, as `mtp train` starts: CPU, gloo, bf16, megatron's groups and DeepSpeed's comm layer."""
    code = (
        "import os, sys\n"
        "os.environ.pop('DS_ACCELERATOR', None)\n"
        "from parallel.runtime import start\n"
        "rt = start(tp=1, pp=1, dtype='bfloat16', collective_timeout_s=60)\n"
        "assert 'deepspeed' in sys.modules\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "from megatron.core import parallel_state\n"
        "print(rt.device, rt.backend, rt.dtype, os.environ['DS_ACCELERATOR'], get_accelerator()._name,\n"
        "      parallel_state.model_parallel_is_initialized(), rt.place.world_size, rt.is_main)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["cpu", "gloo", "torch.bfloat16", "cpu", "cpu", "True", "1", "True"]

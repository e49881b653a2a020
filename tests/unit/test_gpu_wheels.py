"""`make gpu-wheels`: which packages a GPU machine without network is sent (pretrain/bench/gpu_wheels.py).

What is chosen is tested here from this venv's metadata; the download itself
needs PyPI and was run by hand (docs/benchmarks.md, "A GPU machine without network").
"""

import pytest

from pretrain.bench.gpu_wheels import ROOTS, already_there, closure, main, optional_pins
from pretrain.errors import UserError


def test_the_closure_holds_the_stack_and_its_requirements_but_never_the_cuda_stack():
    pins = closure(ROOTS, there=set())
    assert {"megatron-core", "deepspeed", "webdataset", "mlflow", "hjson", "pydantic", "braceexpand"} <= set(pins)
    assert not [name for name in pins if name in ("torch", "triton") or name.startswith("nvidia-")]
    assert pins["megatron-core"] == "0.16.1" and pins["deepspeed"] == "0.19.8"  # the versions make setup pinned


def test_what_the_gpu_machine_has_is_left_out_with_everything_below_it():
    full = closure(("deepspeed",), there=set())
    assert {"pydantic", "pydantic-core", "annotated-types"} <= set(full)
    trimmed = closure(("deepspeed",), there={"pydantic", "numpy"})
    assert "pydantic" not in trimmed and "pydantic-core" not in trimmed and "numpy" not in trimmed
    assert "hjson" in trimmed


def test_a_pip_freeze_names_packages_however_they_are_written(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("Flask_Cors==6.0.1\ntorch @ file:///wheels/torch.whl\n# comment\n\nzope.interface>=7\nnumpy\n")
    assert already_there(have) == {"flask-cors", "torch", "zope-interface", "numpy"}


def test_the_gpu_kernels_extra_is_pinned_from_pyproject():
    assert optional_pins() == {"liger-kernel": "0.8.5", "cut-cross-entropy": "25.1.1"}


@pytest.mark.parametrize("args, says", [
    (["--python", "three"], "--python three is not a Python version like 3.12"),
    (["--have", "/no/such/file"], "--have /no/such/file does not exist"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, says):
    assert main(["--out", str(tmp_path / "wheels"), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "wheels").exists()


def test_a_missing_package_names_make_setup():
    with pytest.raises(UserError, match="not installed in this venv; run `make setup` first"):
        closure(("no-such-package-here",), there=set())

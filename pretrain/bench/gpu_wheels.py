"""`make gpu-wheels`: what `make gpu-check` needs on a GPU machine that has a CUDA torch and no network.

GPU nodes of clusters, and many GPU containers, cannot reach PyPI; they
hold a CUDA build of torch (and often numpy, PyYAML, pytest, ...). The
check still needs this project's own stack: megatron-core, DeepSpeed,
webdataset, the fused cross-entropy libraries. This module collects it
on a machine that can reach PyPI:

- the dependency closure of the packages the check imports (ROOTS), read
  from the installed distributions' metadata, at the versions this venv
  pins, plus the optional `gpu-kernels` libraries at pyproject's pins;
- as wheels for the GPU machine's Python and platform (`pip download`,
  the registry's own files); DeepSpeed, which PyPI ships as source only,
  as its source distribution, built there against the CUDA torch;
- never torch, Triton or NVIDIA's CUDA libraries: the GPU machine's own
  build must be used, and they are gigabytes;
- less whatever the GPU machine already has, when `--have` names the
  output of `pip list --format=freeze` from there, so the folder stays
  small enough to copy (for a CUDA image with the scientific stack, 45 MiB,
  MLflow and its server side 32 MiB of it).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("megatron-core", "deepspeed", "webdataset", "tokenizers", "safetensors", "xxhash", "pyyaml", "zstandard",
         "flufl.lock", "psutil", "numpy", "pytest", "mlflow")
OPTIONAL_EXTRA = "gpu-kernels"  # liger-kernel, cut-cross-entropy (pyproject.toml)
NEVER = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")  # the GPU machine's own CUDA stack
SOURCE_ONLY = ("deepspeed",)
PLATFORMS = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...], there: set[str]) -> dict[str, str]:
    """{package: installed version} of `roots` and all they require here, less the CUDA stack and what is `there`.

    A package the GPU machine has is not followed: its own requirements are met there.
    """
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found or name in there or NEVER.match(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as err:
            raise UserError(f"{name} is not installed in this venv; run `make setup` first") from err
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def optional_pins() -> dict[str, str]:
    """pyproject's `gpu-kernels` extra as {package: version} (not installed on a CPU machine)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for text in project["optional-dependencies"][OPTIONAL_EXTRA]:
        req = Requirement(text)
        pins[canonical(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def already_there(have: Path | None) -> set[str]:
    """Names in a `pip list --format=freeze` (or one name a line) of the GPU machine."""
    if have is None:
        return set()
    if not have.is_file():
        raise UserError(f"--have {have} does not exist; write it on the GPU machine with "
                        "`python3 -m pip list --format=freeze > FILE`")
    names = (re.split(r"[=<>~ @]", line.strip(), maxsplit=1)[0] for line in have.read_text().splitlines())
    return {canonical(n) for n in names if n and not n.startswith("#")}


def download(pins: dict[str, str], out: Path, python: str) -> None:
    """Every pin's file for `python` on x86-64 Linux into `out`, one `pip download` for wheels, one for sources."""
    wheels = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in SOURCE_ONLY]
    sources = [f"{n}=={v}" for n, v in sorted(pins.items()) if n in SOURCE_ONLY]
    platform = [arg for p in PLATFORMS for arg in ("--platform", f"{p}_x86_64")]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(out)]
    if wheels:
        _pip([*base, "--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platform,
              *wheels])
    if sources:
        _pip([*base, "--no-binary=:all:", *sources])


def replace_with_download(pins: dict[str, str], out: Path, python: str) -> None:
    """Download into a folder beside `out`, then put it in `out`'s place: a failed download keeps the old one.

    Two versions of one package in the folder would stop the install, so it is replaced, never added to.
    """
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        download(pins, partial, python)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def _pip(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"pip download failed: {last}; this machine must reach PyPI, and --python name a Python "
                        "that these pins publish wheels for")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the wheels (made if missing)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    parser.add_argument("--have", type=Path, help="`pip list --format=freeze` of the GPU machine: left out")
    args = parser.parse_args(argv)
    try:
        if not re.fullmatch(r"3\.\d+", args.python):
            raise UserError(f"--python {args.python} is not a Python version like 3.12")
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"--out {args.out} is a file; name a folder")
        there = already_there(args.have)
        pins = {n: v for n, v in {**closure(ROOTS, there), **optional_pins()}.items() if n not in there}
        replace_with_download(pins, args.out, args.python)
    except UserError as err:
        print(f"make gpu-wheels: error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"{len(pins)} packages for Python {args.python} in {args.out} ({size:.1f} MiB): "
          f"{', '.join(sorted(pins))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

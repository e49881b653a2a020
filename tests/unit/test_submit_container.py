"""`mtp submit --container-image` and slurm/train.sbatch's container launch.

The sbatch command comes from the real `mtp submit --dry-run`. The srun line
comes from running the real batch script with bash, where `srun`, `scontrol`
and `nvidia-smi` are stubs that record their arguments: SLURM itself, pyxis
and Apptainer are not on this machine (tests/integration/test_slurm.py runs
the script under a real SLURM without a container).
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import main

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train.sbatch"
IMAGE = "nvcr.io#me/mtp:gpu"
USR1_SHELL = ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun-node"]


@pytest.fixture
def data_dir(small_corpus) -> Path:
    """Real prepared data: `mtp submit` checks its manifest and tokenizer before it writes anything."""
    return small_corpus


def submitted(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """The sbatch command `mtp submit --dry-run` writes into submit.sh."""
    run_dir = tmp_path / "run"
    assert main(["submit", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--nodes", "1", "--dry-run",
                 f"data.dir={data}", f"run.dir={run_dir}", *extra]) == 0
    return shlex.split((run_dir / "slurm" / "submit.sh").read_text().splitlines()[-1])[1:]  # after `exec`


def exported(command: list[str]) -> dict[str, str]:
    value = next(arg for arg in command if arg.startswith("--export=")).removeprefix("--export=")
    return dict(item.split("=", 1) for item in value.split(",")[1:])  # after ALL


def test_without_an_image_the_submission_has_no_container_setting(tmp_path, data_dir):
    env = exported(submitted(tmp_path, data_dir))
    assert env["MTP_PYTHON"] == sys.executable
    assert not [name for name in env if name.startswith("MTP_CONTAINER")]


def test_an_image_is_passed_with_its_runtime_mounts_and_python(tmp_path, data_dir):
    plain = submitted(tmp_path, data_dir)
    command = submitted(tmp_path, data_dir, "--container-image", IMAGE, "--container-mount", str(data_dir),
                        "--container-mount", f"{tmp_path}:/scratch:ro")
    env = exported(command)
    assert env["MTP_CONTAINER_IMAGE"] == IMAGE and env["MTP_CONTAINER_RUNTIME"] == "pyxis"
    assert env["MTP_CONTAINER_MOUNTS"] == f"{data_dir}:{data_dir};{tmp_path}:/scratch:ro"
    assert env["MTP_PYTHON"] == "python3"  # the image's, not this machine's
    assert [arg for arg in command if not arg.startswith("--export=")] == \
        [arg for arg in plain if not arg.startswith("--export=")]


def test_a_local_apptainer_image_is_made_absolute(tmp_path, data_dir, monkeypatch):
    (tmp_path / "mtp.sif").write_bytes(b"SIF")
    monkeypatch.chdir(tmp_path)
    env = exported(submitted(tmp_path, data_dir, "--container-image", "mtp.sif", "--container-runtime", "apptainer"))
    assert env["MTP_CONTAINER_IMAGE"] == str(tmp_path / "mtp.sif")
    assert env["MTP_CONTAINER_RUNTIME"] == "apptainer"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--container-runtime", "apptainer"], "need --container-image"),
        (["--container-mount", "/tmp"], "need --container-image"),
        (["--container-image", "./missing.sqsh"], "./missing.sqsh: no such file"),
        (["--container-image", "missing.sif", "--container-runtime", "apptainer"], "missing.sif: no such file"),
        (["--container-image", IMAGE, "--container-mount", "/no/such/dir"], "/no/such/dir does not exist"),
        (["--container-image", IMAGE, "--container-mount", "/a,/b"], "repeat --container-mount"),
    ],
)
def test_bad_container_options_are_one_line_errors(args, needle, tmp_path, data_dir, capsys):
    code = main(["submit", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--nodes", "1", "--dry-run",
                 f"data.dir={data_dir}", f"run.dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "slurm").exists()


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def launch(tmp_path: Path, gpus: int = 0, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the batch script with stub SLURM tools; return it and the argv its srun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun.json"
    stub(bin_dir, "srun", f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "
                          f"\"$@\" > {record}")
    stub(bin_dir, "scontrol", 'echo node1')
    stub(bin_dir, "nvidia-smi", "".join(f"echo 'GPU {i}: H100'\n" for i in range(gpus)) + "exit 0")
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MTP_")},
                "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1",
                "SLURM_JOB_NODELIST": "node1", "MTP_PYTHON": "py", **env}
    proc = subprocess.run(["bash", str(SCRIPT), "--config", "c.yaml", "run.dir=r"], cwd=workdir, env=full_env,
                          capture_output=True, text=True, timeout=60)
    argv = json.loads(record.read_text()) if record.exists() else []
    return proc, argv


def torchrun(nproc: int = 1) -> list[str]:
    return [*USR1_SHELL, "py", "-m", "torch.distributed.run", "--nnodes=1:1", f"--nproc-per-node={nproc}",
            "--max-restarts=3", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:20042", "--rdzv-id=42",
            "-m", "pretrain.cli", "train", "--config", "c.yaml", "run.dir=r"]


SRUN = ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--no-kill=off"]  # one node: no node to survive


def test_script_without_an_image_runs_torchrun_on_the_host(tmp_path):
    proc, argv = launch(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert argv == [*SRUN, *torchrun()]
    assert "container" not in proc.stdout


def test_script_with_a_pyxis_image_passes_it_to_srun(tmp_path):
    work = tmp_path / "work"
    proc, argv = launch(tmp_path, MTP_CONTAINER_IMAGE=IMAGE, MTP_CONTAINER_MOUNTS="/data;/scratch:/s:ro")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert argv == [*SRUN, f"--container-image={IMAGE}", f"--container-workdir={work}",
                    "--no-container-entrypoint", f"--container-mounts={work}:{work},/data:/data,/scratch:/s:ro",
                    *torchrun()]
    assert f"in container {IMAGE} (pyxis)" in proc.stdout


def test_script_with_an_apptainer_image_execs_torchrun_inside_it(tmp_path):
    work = tmp_path / "work"
    proc, argv = launch(tmp_path, gpus=2, MTP_CONTAINER_IMAGE="/images/mtp.sif",
                        MTP_CONTAINER_RUNTIME="apptainer", MTP_CONTAINER_MOUNTS="/data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert argv == [*SRUN, "apptainer", "exec", "--pwd", str(work), "--nv", "--bind", f"{work}:{work}",
                    "--bind", "/data:/data", "/images/mtp.sif", *torchrun(nproc=2)]


def test_script_rejects_an_unknown_runtime(tmp_path):
    proc, argv = launch(tmp_path, MTP_CONTAINER_IMAGE=IMAGE, MTP_CONTAINER_RUNTIME="docker")
    assert proc.returncode == 2 and argv == []
    assert "MTP_CONTAINER_RUNTIME must be pyxis or apptainer, not 'docker'" in proc.stdout

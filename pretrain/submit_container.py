"""`mtp submit --container-image`: run the job's torchrun inside a container image.

slurm/train.sbatch does the launching (enroot/pyxis `srun --container-image`,
or `apptainer exec`); this module checks the options on the login node and
turns them into the script's MTP_CONTAINER_* settings. Without an image the
submission is exactly what it was before.
"""

from pathlib import Path

from pretrain.errors import UserError

RUNTIMES = ("pyxis", "apptainer")
CONTAINER_PYTHON = "python3"  # the image's Python, first on the image's PATH (ours and NGC's)


def add_arguments(parser) -> None:
    parser.add_argument("--container-image", metavar="IMAGE",
                        help="run training in this image: for pyxis a registry image (nvcr.io#me/mtp:gpu) or "
                             "a .sqsh file, for apptainer a .sif file or docker:// reference")
    parser.add_argument("--container-runtime", choices=RUNTIMES,
                        help="pyxis (srun --container-image, the default) or apptainer (apptainer exec)")
    parser.add_argument("--container-mount", action="append", metavar="SRC[:DST[:FLAGS]]",
                        help="another host directory to mount (the submit directory always is); repeatable")


def container_settings(args) -> dict[str, str]:
    """The script's MTP_CONTAINER_* variables (and its Python), or {} without an image."""
    if not args.container_image:
        if args.container_runtime or args.container_mount:
            raise UserError("--container-runtime and --container-mount need --container-image")
        return {}
    runtime = args.container_runtime or "pyxis"
    settings = {
        "MTP_CONTAINER_IMAGE": _image(args.container_image, runtime),
        "MTP_CONTAINER_RUNTIME": runtime,
        "MTP_PYTHON": CONTAINER_PYTHON,
    }
    if args.container_mount:
        settings["MTP_CONTAINER_MOUNTS"] = ";".join(_mount(m) for m in args.container_mount)
    return settings


def _is_file(image: str, runtime: str) -> bool:
    """pyxis reads a path starting with / or ./ as a squashfs file; apptainer anything without a scheme."""
    if runtime == "pyxis":
        return image.startswith(("/", "./", "../"))
    return "://" not in image


def _image(image: str, runtime: str) -> str:
    """The image as the job's nodes must see it: a local file, checked here and made absolute."""
    if not _is_file(image, runtime):
        return image
    path = Path(image).resolve()
    if not path.is_file():
        kind = "squashfs image (enroot import -o FILE docker://...)" if runtime == "pyxis" \
            else "Apptainer image (apptainer build FILE docker-daemon://mtp:gpu)"
        raise UserError(f"--container-image {image}: no such file; build the {kind}, or name a registry image")
    return str(path)


def _mount(spec: str) -> str:
    """A mount as SRC:DST[:FLAGS] with an absolute, existing SRC (the script joins them with ;)."""
    if any(c in spec for c in ",;"):
        raise UserError(f"--container-mount {spec}: commas and semicolons cannot be carried; "
                        "repeat --container-mount once per directory")
    source, _, rest = spec.partition(":")
    path = Path(source).resolve()
    if not path.exists():
        raise UserError(f"--container-mount {spec}: {source} does not exist on this machine")
    return f"{path}:{rest}" if rest else f"{path}:{path}"

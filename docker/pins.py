"""Requirement and constraint lines for the image build (docker/Dockerfile).

The image installs the project's pinned dependencies before its source, so
that layer is rebuilt only when pyproject.toml changes; torch and DeepSpeed
are installed on their own (the CPU wheel; DeepSpeed without build isolation,
since its setup.py imports torch), so they are left out here.

    python3 pins.py requirements pyproject.toml --extra postgres --without torch deepspeed
    python3 pins.py installed 'torch' 'nvidia-*' ...   # constraints that keep a base image's builds

Standard library only: it runs before anything is installed.
"""

import argparse
import fnmatch
import re
import sys
import tomllib
from importlib import metadata


def canonical(name: str) -> str:
    """PEP 503 name: `Transformer_Engine` and `transformer-engine` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def requirements(pyproject: str, extras: list[str], without: list[str]) -> list[str]:
    project = tomllib.load(open(pyproject, "rb"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project.get("optional-dependencies", {})[extra]
    skip = {canonical(name) for name in without}
    return [line for line in lines if requirement_name(line) not in skip]


def installed(patterns: list[str]) -> list[str]:
    """`name==version` of every installed distribution matching a pattern: pip may not replace them."""
    found = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if any(fnmatch.fnmatch(name, canonical(p)) for p in patterns):
            found[name] = f"{name}=={dist.version}"
    return sorted(found.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    req = sub.add_parser("requirements", help="pinned dependencies of pyproject.toml")
    req.add_argument("pyproject")
    req.add_argument("--extra", action="append", default=[], help="optional-dependencies group to add")
    req.add_argument("--without", nargs="*", default=[], help="packages to leave out")
    inst = sub.add_parser("installed", help="constraints pinning installed packages")
    inst.add_argument("patterns", nargs="+", help="package names, shell patterns allowed")
    args = parser.parse_args()
    if args.what == "requirements":
        lines = requirements(args.pyproject, args.extra, args.without)
    else:
        lines = installed(args.patterns)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mtp checkpoint verify RUN_DIR|CHECKPOINT`: check every file of every checkpoint offline.

The trainer checks checkpoints spread over its ranks when it resumes
(pretrain/ckpt_resume.py); this command does the whole check in one
process, for a copy that was just rsynced, archived or restored, and names
every bad file, not only the first. Files are read by a few threads at once
(reads overlap; the checksum runs at many GB/s).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrain.errors import UserError


def register(subparsers, bench_subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect training checkpoints",
                                   description="Inspect training checkpoints.")
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="COMMAND", required=True)
    verify = sub.add_parser(
        "verify", help="check every file of every checkpoint against its manifest",
        description="Check the marker, manifest and every file (size and checksum) of a checkpoint, or of every "
                    "checkpoint under a run directory or checkpoints directory. Exits 0 when all are whole, 1 when "
                    "any is damaged, naming every bad file.",
    )
    verify.add_argument("path", help="a run dir, its checkpoints/ dir, or one step_* dir")
    verify.add_argument("--workers", type=int, default=4, help="files read at once (default 4)")
    verify.set_defaults(func=_verify)


def checkpoints_under(path: str) -> list[Path]:
    """The step_* dirs `path` names: itself, or those in it or in its checkpoints/."""
    from pretrain.checkpoint import step_of

    root = Path(path)
    if not root.exists():
        raise UserError(f"{path} does not exist; pass a run dir, its checkpoints/ dir or one step_* dir")
    if step_of(root) is not None:
        return [root]
    for folder in (root, root / "checkpoints"):
        found = sorted((p for p in folder.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of) \
            if folder.is_dir() else []
        if found:
            return found
    raise UserError(f"no checkpoint (step_* dir) under {path}; pass a run dir, its checkpoints/ dir or a step_* dir")


def _verify(args) -> int:
    from pretrain.checkpoint import check_metadata, marker_only_note, verify

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    dirs = checkpoints_under(args.path)
    with ThreadPoolExecutor(args.workers) as pool:
        verdicts = list(pool.map(verify, dirs))
    damaged = 0
    for path, problems in zip(dirs, verdicts):
        survey = check_metadata(path)
        if not problems:
            print(f"{path}: whole ({len(survey.files)} files, {survey.nbytes / 1e6:.1f} MB)")
        elif problems == [marker_only_note(path, survey.step)]:
            damaged += 1
            print(f"BAD {path}: {problems[0]}", file=sys.stderr)
        else:
            damaged += 1
            print(f"BAD {path}: {len(problems)} problem(s)", file=sys.stderr)
            for problem in problems:
                print(f"BAD {path}: {problem}", file=sys.stderr)
    if damaged:
        print(f"{damaged} of {len(dirs)} checkpoint(s) damaged; resume picks the newest whole one, "
              "or restore the named files from a copy", file=sys.stderr)
        return 1
    print(f"all {len(dirs)} checkpoint(s) whole")
    return 0

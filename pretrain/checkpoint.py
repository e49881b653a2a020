"""Atomic, verifiable checkpoints on a filesystem, whatever engine writes the state.

Layout under `root`:

    step_000020/            a sealed checkpoint
        ...                 engine files (DeepSpeed's), rng/, layout/, config.yaml, tokenizer/
        extra.json          trainer state: step, data cursor, MLflow run id, ...
        manifest.json       size, checksum and writer rank of every other file
        COMPLETE            written last, after everything above is on disk
    .tmp-step_000040/       being written; never read, removed by the next begin()
    set-aside/              checkpoints moved out of the way (`mtp train --from-scratch`, a
                            same-step checkpoint replaced); never read, never deleted by the trainer

A directory gets its `step_*` name only by an atomic rename after COMPLETE
exists, so a killed writer leaves at most a temp dir behind. Every rank
writes and checksums its own files (pretrain/ckpt_writer.py); rank 0 seals
with the digests they report (`seal`). Checkpoints are deleted only by the
keep-newest-`keep` rule after a newer one is sealed, never for looking
newer or older than what a run resumed from.

Verification is split so that no rank reads everything: `survey` checks
markers, manifests and every file's size (metadata only); `check_digests`
checks the digests of the files one rank is given (`assign`).
`verify` does all of it in one process (`mtp checkpoint verify`, export).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.ckpt_writer import ALGORITHM, FileRecord, PendingFile, digest_of, file_digest, fsync_path
from pretrain.errors import UserError

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"  # sub-directory the engine (DeepSpeed) writes its own files into
MANIFEST = "manifest.json"
EXTRA = "extra.json"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
SET_ASIDE = "set-aside"
MANIFEST_FORMAT = 2  # 1: sha256 of every file, hashed by rank 0 (no "format" key); 2: per-rank digests
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Survey:
    """What metadata alone says about one `step_*` dir."""

    path: Path
    step: int
    sealed: bool  # has its COMPLETE marker
    files: dict[str, dict]  # the manifest's entries; empty when it is unreadable
    problem: str | None  # a reason it cannot be used, found without reading file contents

    @property
    def nbytes(self) -> int:
        return sum(int(e.get("size", 0)) for e in self.files.values())


class CheckpointStore:
    """Owns where checkpoints live, how they become complete, and which ones exist."""

    def __init__(self, root: str, keep: int):
        if keep < 1:
            raise UserError("checkpoint.keep must be >= 1; the newest checkpoint is always kept")
        self.root = Path(root)
        self.keep = keep

    def tmp_dir(self, step: int) -> str:
        """The temp dir for `step`; a pure function of the step so every rank can compute it."""
        return str(self.root / f"{TMP_PREFIX}{name(step)}")

    def begin(self, step: int) -> str:
        """Remove temp dirs a killed writer left behind and return a fresh, empty one for `step`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temps()
        tmp = Path(self.tmp_dir(step))
        tmp.mkdir()
        return str(tmp)

    def write_extra(self, tmp_dir: str, step: int, extra: dict) -> None:
        _write_synced(Path(tmp_dir) / EXTRA, json.dumps({**extra, "step": step}, indent=2, sort_keys=True))

    def seal(self, tmp_dir: str, step: int, records: list[FileRecord]) -> str:
        """Make `tmp_dir` the checkpoint of `step` from every rank's file records; prune; return its path.

        Files no rank reported (rank 0's extra.json, config, tokenizer) are
        checksummed here; they are small.
        """
        tmp = Path(tmp_dir)
        files = {r.rel: {"size": r.size, ALGORITHM: r.digest, "rank": r.rank} for r in records}
        for rel in _payload_files(tmp):
            if rel not in files:
                fsync_path(str(tmp / rel))
                files[rel] = {"size": (tmp / rel).stat().st_size, ALGORITHM: file_digest(tmp / rel, ALGORITHM),
                              "rank": 0}
        for rel, entry in files.items():
            if not (tmp / rel).is_file():
                raise OSError(f"{rel}, written by rank {entry['rank']}, is not in {tmp} (is {self.root} on a file "
                              "system every rank shares?)")
            if (tmp / rel).stat().st_size != entry["size"]:
                raise OSError(f"{rel} has {(tmp / rel).stat().st_size} bytes on disk but its writer "
                              f"(rank {entry['rank']}) reported {entry['size']}")
        manifest = {"format": MANIFEST_FORMAT, "step": step, "checksum": ALGORITHM, "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        _write_synced(tmp / COMPLETE, f"{step}\n")
        for directory in sorted({p for p in tmp.rglob("*") if p.is_dir()}, reverse=True):
            fsync_path(str(directory))
        fsync_path(str(tmp))
        final = self.root / name(step)
        self._replace(tmp, final)
        try:
            self._prune(step)
        except OSError as err:  # sealed already: a checkpoint that could not be deleted is no failure
            log.warning("could not delete an old checkpoint after sealing %s: %s", final, err)
        return str(final)

    def remove_tmp(self, step: int) -> None:
        """Drop the temp dir of a save that failed; nothing sealed is touched."""
        shutil.rmtree(self.tmp_dir(step), ignore_errors=True)

    def survey(self) -> list[Survey]:
        """Every `step_*` dir, newest first, with what its metadata says (no file contents read)."""
        return [check_metadata(path) for _, path in reversed(self._step_dirs())]

    def latest(self) -> tuple[str, dict] | None:
        """The newest sealed checkpoint whose files all match their manifest, read in this one process.

        For single-process tools (export); the trainer decides collectively
        (pretrain/ckpt_resume.py). Skipped ones are logged with the reason.
        """
        for entry in self.survey():
            problems = verify(entry.path)
            if not problems:
                return str(entry.path), json.loads((entry.path / EXTRA).read_text())
            log.warning("skipping checkpoint %s: %s", entry.path, "; ".join(problems))
        return None

    def newest_sealed(self) -> str | None:
        """The name of the newest dir with a COMPLETE marker (not re-verified): for messages."""
        sealed = self.list()
        return Path(sealed[-1]).name if sealed else None

    def list(self) -> list[str]:
        """Paths of the checkpoints with a COMPLETE marker, oldest first (not re-verified)."""
        return [str(p) for _, p in self._step_dirs() if (p / COMPLETE).is_file()]

    def set_aside(self) -> Path | None:
        """Move every `step_*` dir into a new set-aside/<UTC time>/ (a start from scratch); None when there are none."""
        dirs = self._step_dirs()
        if not dirs:
            return None
        target = self.set_aside_dir()
        for _, path in dirs:
            os.replace(path, target / path.name)
        fsync_path(str(self.root))
        return target

    def set_aside_dir(self) -> Path:
        """A new, empty set-aside/<UTC time>/ folder."""
        target = _fresh(self.root / SET_ASIDE / _utc_stamp())
        target.mkdir(parents=True)
        return target

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """Every `step_*` dir under root, oldest first, sealed or not."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def _replace(self, tmp: Path, final: Path) -> None:
        """Rename tmp to final; a dir of the same step already there (damaged, or from before a fallback)
        is moved into set-aside/, not deleted."""
        if final.exists():
            aside = _fresh(self.root / SET_ASIDE / f"{final.name}.replaced-{_utc_stamp()}")
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, aside)
            log.warning("moved the earlier %s aside to %s before sealing the new one; delete it when no longer "
                        "needed", final, aside)
        os.replace(tmp, final)
        fsync_path(str(self.root))

    def _prune(self, sealed_step: int) -> None:
        """Keep the newest `keep` sealed checkpoints up to `sealed_step`; delete every dir older than those.

        Dirs newer than `sealed_step` (a checkpoint a resume could not use)
        and unsealed dirs between the kept ones stay: only age beyond the
        newest `keep` sealed checkpoints removes anything.
        """
        steps = self._step_dirs()
        sealed = [step for step, p in steps if step <= sealed_step and (p / COMPLETE).is_file()]
        if len(sealed) <= self.keep:
            return
        oldest_kept = sealed[-self.keep]
        for step, path in steps:
            if step < oldest_kept:
                shutil.rmtree(path)

    def _remove_temps(self) -> None:
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def check_metadata(path: Path) -> Survey:
    """Marker, manifest, extra.json and the size of every file: everything but the file contents."""
    sealed = (path / COMPLETE).is_file()
    step = step_of(path) or 0
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        json.loads((path / EXTRA).read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Survey(path, step, sealed, {}, f"unreadable {MANIFEST} or {EXTRA} ({err})")
    problems = [p for rel, entry in files.items() if (p := _size_problem(path, rel, entry))]
    return Survey(path, step, sealed, files, "; ".join(problems) or None)


def _size_problem(root: Path, rel: str, entry: dict) -> str | None:
    file = root / rel
    if not file.is_file():
        return f"{rel} is missing"
    if file.stat().st_size != entry.get("size"):
        return f"{rel} has {file.stat().st_size} bytes, manifest says {entry.get('size')}"
    return None


def check_digests(root: Path, files: dict[str, dict], rels: list[str]) -> list[str]:
    """One problem per file of `rels` whose contents do not match its manifest entry."""
    problems = []
    for rel in rels:
        entry = files[rel]
        if problem := _size_problem(root, rel, entry):
            problems.append(problem)
            continue
        known = digest_of(entry)
        if known is None:
            problems.append(f"{rel}: its manifest entry holds no checksum this version knows")
        elif file_digest(root / rel, known[0]) != known[1]:
            problems.append(f"{rel} does not match its {known[0]} in the manifest")
    return problems


def assign(files: dict[str, dict], world: int) -> list[list[str]]:
    """Which rank checks which files: each file once, by its writer while the world size is the same.

    Files of writers beyond the world (a run resumed on fewer ranks) and
    those of older manifests (no writer recorded) go to the least-loaded
    rank by bytes, in a fixed order, so every rank computes the same split.
    """
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    orphans = []
    for rel in sorted(files):
        rank = files[rel].get("rank")
        if isinstance(rank, int) and 0 <= rank < world:
            shares[rank].append(rel)
            load[rank] += int(files[rel].get("size", 0))
        else:
            orphans.append(rel)
    for rel in sorted(orphans, key=lambda r: (-int(files[r].get("size", 0)), r)):
        rank = min(range(world), key=lambda r: (load[r], r))
        shares[rank].append(rel)
        load[rank] += int(files[rel].get("size", 0))
    return shares


def marker_only_note(path: Path, step: int) -> str:
    return (f"only its {COMPLETE} marker is missing, every file matches its manifest (if this copy is trusted, "
            f"restore the marker: echo {step} > {path / COMPLETE})")


def verdict(survey: Survey, problems: list[str]) -> list[str]:
    """Why a checkpoint cannot be used, given what was found in its files; [] when it can."""
    if survey.sealed:
        return problems
    return [f"no {COMPLETE} marker", *problems] if problems else [marker_only_note(survey.path, survey.step)]


def verify(path: Path) -> list[str]:
    """Every reason the checkpoint at `path` cannot be used, naming each bad file; [] when it is whole."""
    survey = check_metadata(path)
    problems = [survey.problem] if not survey.files else check_digests(path, survey.files, sorted(survey.files))
    return verdict(survey, problems)


def _payload_files(root: Path) -> list[str]:
    """Relative paths of every file the manifest covers: all but the manifest and marker."""
    rels = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return sorted(r for r in rels if r not in (MANIFEST, COMPLETE))


def _utc_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _fresh(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng", f"rank_{rank:05d}.pt")


def rng_state_file(ckpt_dir: str, rank: int, device: torch.device) -> PendingFile:
    """This rank's python, numpy, torch CPU and (on a GPU) its device's generator states, to be written."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return PendingFile(rng_file(ckpt_dir, rank), state=state)


def load_rng_state(ckpt_dir: str, rank: int, device: torch.device) -> bool:
    """Restore what `rng_state_file` held for `rank`; False (and a warning) when the file is absent.

    It is absent when the run resumes on more ranks than saved it; those
    ranks keep the generators the trainer seeded.
    """
    path = rng_file(ckpt_dir, rank)
    if not os.path.isfile(path):
        log.warning("no RNG state for rank %d in %s; keeping the freshly seeded generators", rank, ckpt_dir)
        return False
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    name_, keys, *rest = state["numpy"]
    np.random.set_state((name_, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and device.type == "cuda":  # older checkpoints kept a list
        torch.cuda.set_rng_state(state["cuda"], device)
    return True

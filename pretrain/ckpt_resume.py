"""Where a run resumes: all ranks agree on the newest checkpoint that is whole everywhere.

Nobody reads a whole 100-200 GB checkpoint alone: rank 0 surveys the
checkpoint dirs (markers, manifests, every file's size: metadata only) and
broadcasts the survey; then, newest first, every rank checksums its share
of the candidate's files (`checkpoint.assign`: the files it wrote, while the
world size is unchanged) and one gather tells every rank what every other
found. All ranks therefore take, or skip, the same checkpoint.

When checkpoints exist but none is whole, the run refuses with one line
naming each and why, and touches nothing; `--from-scratch` starts over and
moves the old checkpoints (and the metrics and sample logs) aside.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pretrain.checkpoint import EXTRA, SET_ASIDE, CheckpointStore, Survey, assign, check_digests, verdict
from pretrain.ckpt_group import CheckpointGroup
from pretrain.errors import UserError

log = logging.getLogger("pretrain.checkpoint")


def choose(store: CheckpointStore, group: CheckpointGroup) -> tuple[str, dict] | None:
    """(path, extra) of the newest checkpoint whole on every rank; None: there are none, a fresh run."""
    surveys: list[Survey] = group.broadcast(store.survey() if group.rank == 0 else None, "reading the checkpoints")
    skipped: list[tuple[Survey, list[str]]] = []
    for survey in surveys:
        problems = verdict(survey, [survey.problem] if survey.problem else _digest_problems(survey, group))
        if not problems:
            _warn(skipped, group.rank)
            return str(survey.path), json.loads((survey.path / EXTRA).read_text())
        skipped.append((survey, problems))
    if not surveys:
        return None
    raise UserError(
        f"no checkpoint in {store.root} can be resumed, and nothing was changed: "
        + "; ".join(f"{s.path.name}: {', '.join(problems)}" for s, problems in skipped)
        + f". Repair or restore one (`mtp checkpoint verify {store.root}` names every bad file), or start over "
        f"with `mtp train --from-scratch`, which moves them into {store.root / SET_ASIDE}/"
    )


def _digest_problems(survey: Survey, group: CheckpointGroup) -> list[str]:
    """Every rank checks its share of the files; the problems all ranks found, each naming its finder."""
    mine = assign(survey.files, group.world)[group.rank]
    found = check_digests(survey.path, survey.files, mine)
    share = sum(int(survey.files[rel].get("size", 0)) for rel in mine)
    everyone = group.gather(found, f"verifying {survey.path.name}", (survey.nbytes, share))
    return [f"rank {rank} found {problem}" for rank, problems in enumerate(everyone) for problem in problems]


def _warn(skipped: list[tuple[Survey, list[str]]], rank: int) -> None:
    if rank == 0:
        for survey, problems in skipped:
            log.warning("skipping checkpoint %s: %s", survey.path, "; ".join(problems))


def start_over(store: CheckpointStore, group: CheckpointGroup, run_dir: str) -> None:
    """`--from-scratch`: move every checkpoint, metrics.jsonl and samples/ into set-aside/<time>/; delete nothing."""
    if group.rank == 0:
        logs = [p for p in (Path(run_dir) / "metrics.jsonl", Path(run_dir) / "samples") if p.exists()]
        target = store.set_aside()
        if target is None and logs:
            target = store.set_aside_dir()
        for path in logs:
            os.replace(path, target / path.name)
        if target is not None:
            print(f"starting from scratch: the earlier checkpoints and logs are in {target}", flush=True)
    group.broadcast(None, "moving the earlier checkpoints aside")

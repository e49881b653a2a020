"""`mtp data verify`: re-check every shard and tokenizer file against the manifest.

All shards are checked and every bad one is reported, not only the first, so one
run tells the user everything that must be re-copied or re-prepared.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

from data_pipeline import locations
from data_pipeline.manifest import Manifest, compute_fingerprint, load_manifest
from data_pipeline.shards import ShardError, read_shard


def verify(location: str, workers: int = 2) -> tuple[Manifest, list[str]]:
    """(manifest, problems); each problem is one line naming the bad file and why."""
    manifest = load_manifest(location)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        shard_problems = pool.map(lambda shard: _check_shard(location, shard, manifest.dtype), manifest.shards)
        problems = [p for p in shard_problems if p]
    problems += _check_tokenizer(location, manifest)
    if compute_fingerprint(manifest) != manifest.fingerprint:
        problems.append(f"{locations.resolve(location, 'manifest.json')}: fingerprint does not match its shard list (edited by hand?)")
    return manifest, problems


def _check_shard(location: str, shard, dtype: str) -> str | None:
    try:
        read_shard(location, shard, dtype)
    except ShardError as err:
        return str(err)
    return None


def _check_tokenizer(location: str, manifest: Manifest) -> list[str]:
    problems = []
    for name, expected in manifest.tokenizer.get("files", {}).items():
        data = locations.read_optional(location, name)
        if data is None:
            problems.append(f"tokenizer file {locations.resolve(location, name)}: missing")
        elif hashlib.sha256(data).hexdigest() != expected:
            problems.append(f"tokenizer file {locations.resolve(location, name)}: sha256 differs from the manifest")
    return problems

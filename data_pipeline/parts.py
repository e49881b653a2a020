"""Preparation in parts: `mtp prepare ... --part I/N` on many nodes, `mtp data merge DIR`.

Every part streams the whole corpus listing but tokenizes only the documents
whose identity hashes to it (assign.py), so the N parts together hold every
document exactly once, and a re-run of a part yields the same shards. Parts share
one output directory without clashing:

```
DIR/
  train-00001of00003-000000.tar ...   shards, named by their part
  parts/00001of00003/                 a finished part: manifest.json + tokenizer files
  parts/.00002of00003.tmp-HOST-PID/   a part being built (its shards are written here first)
  manifest.json, tokenizer_info.json  written by the merge once every part is there
```

A part builds everything in its hidden directory, then moves its shards into DIR
and renames the directory to `parts/TAG`: that rename is the mark of a finished
part. The last part to finish merges (and `mtp data merge DIR` does the same by
hand): it checks that every part is there, that all used one tokenizer and the
same settings, then writes the tokenizer files and the one manifest (shards in
part order) and its fingerprint. Two parts finishing at once both write the same
bytes, each with an atomic rename.
"""

import os
import re
import shutil
import socket
import time

from data_pipeline.assign import PartSpec
from data_pipeline.manifest import MANIFEST_FILE, Manifest, load_manifest, write_manifest
from data_pipeline.progress import human
from pretrain.errors import UserError

PARTS_DIR = "parts"
TAG = re.compile(r"^(\d{5})of(\d{5})$")
PART_SHARD = re.compile(r"^(train|val)-\d{5}of\d{5}-\d{6}\.tar$")
MERGED_FILES = (MANIFEST_FILE, "tokenizer_info.json", "tokenizer.json")


def prepare_part(cfg, part: PartSpec, progress_stream=None):
    """Build part `part` of the data set at `cfg.out`; merge when it is the last one."""
    from data_pipeline.prepare import PrepareResult, build, build_tokenizer, make_manifest, save_tokenizer

    start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    tokenizer = build_tokenizer(cfg)  # a file or bytes (validate refuses BPE training per part): cheap
    _check_part_output(out, part, cfg, tokenizer.describe())
    parts_dir = os.path.join(out, PARTS_DIR)
    os.makedirs(parts_dir, exist_ok=True)
    temp = os.path.join(parts_dir, f".{part.tag}.tmp-{socket.gethostname()}-{os.getpid()}")
    os.makedirs(temp)
    try:
        description = save_tokenizer(tokenizer, temp)
        shards, stats = build(cfg, tokenizer, temp, part, progress_stream)
        manifest = make_manifest(cfg, description, shards, stats, parts=part.count)
        manifest.source["part"] = part.index
        write_manifest(temp, manifest)
        _publish_part(out, temp, part, manifest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    merged = not missing_parts(out, part.count)
    if merged:
        merge(out)
    return PrepareResult(out=out, manifest=manifest, stats=stats, seconds=time.perf_counter() - start,
                         part=part, merged=merged)


def _check_part_output(out: str, part: PartSpec, cfg, tokenizer: dict) -> None:
    """--out is empty or holds only parts of this preparation; a finished copy of this part has our settings."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; choose a directory path")
    if not os.path.isdir(out):
        return
    foreign = [n for n in os.listdir(out) if n != PARTS_DIR and n not in MERGED_FILES and not PART_SHARD.match(n)]
    if foreign:
        raise UserError(f"--out {out} holds files that are not parts of a split preparation ({foreign[0]}, ...); "
                        "choose an empty --out for `--part`")
    counts = {int(m.group(2)) for m in map(TAG.match, _part_dirs(out)) if m}
    if counts - {part.count}:
        raise UserError(f"--out {out} holds parts of a preparation in {min(counts - {part.count})} parts, "
                        f"not {part.count}; use the same N for every part or an empty --out")
    done = os.path.join(out, PARTS_DIR, part.tag)
    if os.path.isdir(done) and not cfg.overwrite:
        old = load_manifest(done)
        old_tokenizer = {k: v for k, v in old.tokenizer.items() if k != "files"}
        if old.source.get("settings") != cfg.settings() or old_tokenizer != tokenizer:
            raise UserError(f"part {part} in {out} was prepared with other settings or another tokenizer; "
                            "re-run it with the original ones, or pass --overwrite to replace it")


def _part_dirs(out: str) -> list[str]:
    parts_dir = os.path.join(out, PARTS_DIR)
    return sorted(n for n in os.listdir(parts_dir) if TAG.match(n)) if os.path.isdir(parts_dir) else []


def _publish_part(out: str, temp: str, part: PartSpec, manifest: Manifest) -> None:
    """Shards into DIR, then the part's directory renamed into place (the mark of a finished part)."""
    done = os.path.join(out, PARTS_DIR, part.tag)
    old_names = set()
    if os.path.isdir(done):
        old = load_manifest(done)
        old_names = {s.name for s in old.shards}
        if old.fingerprint != manifest.fingerprint:  # replaced by --overwrite: the merged manifest is stale
            _remove(os.path.join(out, MANIFEST_FILE))
    for shard in manifest.shards:
        os.replace(os.path.join(temp, shard.name), os.path.join(out, shard.name))
    for name in old_names - {s.name for s in manifest.shards}:
        _remove(os.path.join(out, name))
    if os.path.isdir(done):
        stale = f"{temp}.old"
        os.rename(done, stale)
        os.rename(temp, done)
        shutil.rmtree(stale)
    else:
        os.rename(temp, done)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def missing_parts(out: str, count: int) -> list[int]:
    present = {int(m.group(1)) for m in map(TAG.match, _part_dirs(out)) if m and int(m.group(2)) == count}
    return [i for i in range(count) if i not in present]


def merge(directory: str) -> Manifest:
    """Write DIR/manifest.json (and the tokenizer files) from its finished parts; UserError if one is missing."""
    out = os.path.abspath(directory)
    tags = _part_dirs(out)
    if not tags:
        raise UserError(f"{out} holds no parts ({os.path.join(out, PARTS_DIR)}/ is missing or empty); "
                        "run `mtp prepare ... --out DIR --part I/N` for every I first")
    count = int(TAG.match(tags[0]).group(2))
    missing = missing_parts(out, count)
    if missing:
        raise UserError(_missing_message(out, missing, count))
    manifests = [load_manifest(os.path.join(out, PARTS_DIR, PartSpec(i, count).tag)) for i in range(count)]
    _check_alike(manifests, count)
    for index, part in enumerate(manifests):
        _check_shards(out, part, PartSpec(index, count))
    manifest = _combined(manifests)
    from data_pipeline.prepare import check_usable

    check_usable(manifest, manifest.val_fraction, out)
    first = os.path.join(out, PARTS_DIR, PartSpec(0, count).tag)
    for name in manifest.tokenizer.get("files", {}):
        _copy_atomic(os.path.join(first, name), os.path.join(out, name))
    write_manifest(out, manifest)
    return manifest


def _missing_message(out: str, missing: list[int], count: int) -> str:
    running = {m.group(1) for n in os.listdir(os.path.join(out, PARTS_DIR))
               if (m := re.match(r"^\.(\d{5})of\d{5}\.tmp-", n))}
    first = PartSpec(missing[0], count)
    state = " (still running, or crashed: its hidden parts/.TAG.tmp-* directory is there)" \
        if first.tag[:5] in running else ""
    names = ", ".join(str(PartSpec(i, count)) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (f"{out}: {len(missing)} of {count} parts are missing ({names}){state}; run "
            f"`mtp prepare ... --out {out} --part {first}` (same arguments as the other parts), then merge again")


def _check_alike(manifests: list[Manifest], count: int) -> None:
    first = manifests[0]
    for index, part in enumerate(manifests[1:], start=1):
        if part.tokenizer != first.tokenizer:
            raise UserError(
                f"parts 0/{count} and {index}/{count} were prepared with different tokenizers "
                f"({tokenizer_name(first.tokenizer)} vs {tokenizer_name(part.tokenizer)}); re-run the odd part "
                "with the same --tokenizer PATH and --overwrite"
            )
        if part.source.get("settings") != first.source.get("settings") or part.dtype != first.dtype:
            raise UserError(f"parts 0/{count} and {index}/{count} were prepared with different --source, --seed, "
                            "--val-fraction, --shard-tokens, --sample-tokens or --text-key; re-run the odd part with "
                            "the arguments of the others and --overwrite")


def tokenizer_name(description: dict) -> str:
    """`byte 258 ids` or `bpe 8192 ids, tokenizer.json 3f2a...`: enough to tell two tokenizers apart."""
    digest = description.get("files", {}).get("tokenizer.json")
    text = f"{description.get('type')} {description.get('vocab_size')} ids"
    return text + (f", tokenizer.json sha256 {digest[:12]}" if digest else "")


def _check_shards(out: str, part: Manifest, spec: PartSpec) -> None:
    for shard in part.shards:
        path = os.path.join(out, shard.name)
        if not os.path.isfile(path) or os.path.getsize(path) != shard.bytes:
            raise UserError(f"shard {path} of part {spec} is missing or has another size; re-run "
                            f"`mtp prepare ... --part {spec}`")


def _combined(manifests: list[Manifest]) -> Manifest:
    first = manifests[0]
    source = {key: first.source[key] for key in ("description", "files", "settings")}
    for key in ("documents", "bytes"):
        source[key] = sum(m.source[key] for m in manifests)
    manifest = Manifest(tokenizer=first.tokenizer, dtype=first.dtype, shards=[s for m in manifests for s in m.shards],
                        source=source, seed=first.seed, val_fraction=first.val_fraction,
                        shard_tokens=first.shard_tokens, sample_tokens=first.sample_tokens, parts=len(manifests))
    manifest.finalize()
    return manifest


def _copy_atomic(src: str, dst: str) -> None:
    temp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, temp)
    os.replace(temp, dst)


def merge_summary(manifest: Manifest, out: str) -> str:
    splits = manifest.splits
    return (f"merged {manifest.parts} parts into {out}: train {splits['train']['documents']} documents "
            f"({human(splits['train']['tokens'])} tokens), val {splits['val']['documents']} documents "
            f"({human(splits['val']['tokens'])} tokens), {len(manifest.shards)} shards, "
            f"fingerprint {manifest.fingerprint[:16]}")

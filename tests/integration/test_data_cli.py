"""The real `mtp` script: prepare, verify (catching damaged shards), bad inputs, bench."""

import json
import os
import subprocess
import sys

import pytest

from data_pipeline.manifest import load_manifest
from data_pipeline.sources import stdlib_root

MTP = os.path.join(os.path.dirname(sys.executable), "mtp")
JSON_DIR = os.path.join(stdlib_root(), "json")
EMAIL_DIR = os.path.join(stdlib_root(), "email")


def mtp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MTP, *args], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "data")
    result = mtp("prepare", "--source", EMAIL_DIR, "--include", "*.py", "--tokenizer", "byte", "--out", out,
                 "--workers", "2", "--shard-tokens", "50000", "--sample-tokens", "10000", "--val-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"prepared {out}:") and "tokens/s" in result.stdout
    assert "prepare: " in result.stderr  # progress as plain lines when stderr is not a terminal
    return out


def test_default_stdlib_corpus_prepares_and_verifies(tmp_path):
    out = str(tmp_path / "stdlib")
    result = mtp("prepare", "--source", "stdlib", "--tokenizer", "byte", "--out", out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert manifest.source["files"] > 1000 and manifest.splits["val"]["documents"] > 0
    assert mtp("data", "verify", out).returncode == 0


def test_verify_names_every_damaged_shard(small, tmp_path):
    assert mtp("data", "verify", small).returncode == 0
    shards = load_manifest(small).shards
    truncated, flipped = os.path.join(small, shards[0].name), os.path.join(small, shards[2].name)
    os.truncate(truncated, os.path.getsize(truncated) - 700)
    with open(flipped, "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    result = mtp("data", "verify", small)
    assert result.returncode == 1
    bad_lines = [line for line in result.stderr.splitlines() if line.startswith("BAD ")]
    assert len(bad_lines) == 2, result.stderr
    assert shards[0].name in bad_lines[0] and "truncated" in bad_lines[0]
    assert shards[2].name in bad_lines[1] and "sha256" in bad_lines[1]


def test_data_info_prints_the_counts(tmp_path):
    out = str(tmp_path / "d")
    assert mtp("prepare", "--source", JSON_DIR, "--out", out, "--workers", "1", "--val-fraction", "0.2").returncode == 0
    info = json.loads(mtp("data", "info", out).stdout)
    assert info["vocab_size"] == 258 and info["tokens"]["train"] > 0
    assert info["documents"]["val"] + info["documents"]["train"] == 5 and info["documents"]["val"] >= 1


def test_prepare_refuses_an_existing_output(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _one_line_error(mtp("prepare", "--source", JSON_DIR, "--out", str(out)), "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--source", "/no/such/corpus"], "/no/such/corpus"),
        (["--source", JSON_DIR, "--tokenizer", "bpe:many"], "--tokenizer bpe:many"),
        (["--source", JSON_DIR, "--tokenizer", "missing.json"], "--tokenizer missing.json"),
        (["--source", "BAD_JSONL"], "bad.jsonl:2"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    args = [str(bad) if a == "BAD_JSONL" else a for a in args]
    out = tmp_path / "out"
    _one_line_error(mtp("prepare", *args, "--out", str(out), "--workers", "1"), needle)
    assert not out.exists()


def test_verify_of_a_missing_directory_is_one_line():
    _one_line_error(mtp("data", "verify", "/no/such/data"), "mtp prepare")


def _prepare_args(out: str, *extra: str) -> list[str]:
    return ["prepare", "--source", EMAIL_DIR, "--include", "*.py", "--out", out, "--workers", "1",
            "--shard-tokens", "50000", "--sample-tokens", "10000", "--val-fraction", "0.1", *extra]


def _shard_documents(out: str) -> tuple[list[bytes], int]:
    """The documents of a data set (eod-split byte strings, sorted) and its token count."""
    import numpy as np

    from data_pipeline.shards import read_shard

    manifest = load_manifest(out)
    docs, tokens = [], 0
    for split in ("train", "val"):
        stream = np.concatenate([read_shard(out, s, manifest.dtype) for s in manifest.split_shards(split)])
        tokens += len(stream)
        docs += [d.tobytes() for d in np.split(stream, np.nonzero(stream == 256)[0] + 1) if len(d)]
    return sorted(docs), tokens


def test_three_concurrent_parts_merge_to_one_prepare(tmp_path):
    whole, out = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert mtp(*_prepare_args(whole)).returncode == 0
    procs = [subprocess.Popen([MTP, *_prepare_args(out, "--part", f"{i}/3")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]  # all three at once
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    assert sum("all parts done, manifest written" in stdout for stdout, _, _ in results) >= 1
    assert _shard_documents(out) == _shard_documents(whole)
    merged = mtp("data", "merge", out)  # by hand too: the same manifest again
    assert merged.returncode == 0 and merged.stdout.startswith(f"merged 3 parts into {out}")
    assert mtp("data", "verify", out).returncode == 0


def test_merge_and_part_mistakes_give_one_line_and_exit_2(tmp_path):
    out = str(tmp_path / "parts")
    assert mtp(*_prepare_args(out, "--part", "0/2")).returncode == 0
    _one_line_error(mtp("data", "merge", out), "1 of 2 parts are missing (1/2)", "--part 1/2")
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    _one_line_error(mtp(*_prepare_args(out, "--part", "2/2")), "--part 2/2", "numbered 0..1")
    _one_line_error(mtp(*_prepare_args(str(tmp_path / "x"), "--part", "0/2", "--tokenizer", "bpe:300")),
                    "every part would learn its own BPE")


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 9, "bad.jsonl.zst: cannot be read as jsonl.zst"),
    ("bad.parquet", b"not parquet", "bad.parquet: not a readable Parquet file"),
])
def test_unreadable_compressed_or_parquet_files_give_one_line(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    _one_line_error(mtp("prepare", "--source", str(tmp_path / name), "--out", str(out), "--workers", "2"), needle)
    assert not out.exists()


def test_data_info_plans_a_mixture(tmp_path):
    small = str(tmp_path / "data")
    assert mtp(*_prepare_args(small)).returncode == 0
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  sources:\n    - {{dir: {small}, weight: 3, name: code}}\n"
                      f"    - {{dir: {small}, weight: 1, name: again}}\n"
                      "train: {seq_len: 64, global_batch_size: 8, micro_batch_size: 4, max_steps: 100}\n"
                      "model: {n_future: 2}\n")
    tokens = 3 * 4096 * 64  # three whole mixture blocks: the shares are exact to one window
    plan = json.loads(mtp("data", "info", "--config", str(config), "--tokens", str(tokens), "--json").stdout)
    rows = {r["name"]: r for r in plan["sources"]}
    assert plan["tokens"] == tokens
    assert rows["code"]["share"] == 0.75 and abs(rows["code"]["tokens"] - 0.75 * tokens) <= 64
    assert rows["code"]["tokens"] + rows["again"]["tokens"] == plan["tokens"]
    assert rows["code"]["epochs"] == pytest.approx(rows["code"]["windows"] / rows["code"]["windows_per_epoch"])
    text = mtp("data", "info", "--config", str(config), "train.max_steps=10")
    assert text.returncode == 0 and "plan for 5,120 training tokens" in text.stdout and "code" in text.stdout
    config.write_text(config.read_text().replace("weight: 1,", "weight: 0,"))
    _one_line_error(mtp("data", "info", "--config", str(config)), "data.sources[1].weight must be a positive number")


def test_bench_data_reports_both_rates():
    result = mtp("bench", "data", "--source", JSON_DIR, "--workers", "1", "--seq-len", "64",
                 "--micro-batch", "4", "--stream-tokens", "100000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] > 0 and report["tokenize_tokens_per_s_per_worker"] > 0
    assert report["stream_tokens"] >= 100000 - 4 * 64 and report["stream_tokens_per_s"] > 0


def test_bench_data_at_scale_reports_memory_rates_mixture_and_manifest():
    result = mtp("bench", "data", "--synthetic-docs", "2000", "6000", "--workers", "2", "--seq-len", "64",
                 "--micro-batch", "4", "--stream-tokens", "200000", "--mixture-docs", "3000",
                 "--manifest-shards", "2000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [p["documents"] for p in report["prepare"]] == [2000, 6000]
    for p in report["prepare"]:
        assert p["tokens_per_worker_cpu_s"] > 0 and p["parent_tokens_per_cpu_s"] > 0
        assert p["parent_peak_mb"] > 0 and p["worker_peak_mb"] > 0
    mixture = report["mixture"]
    assert mixture["sources"] == 3 and mixture["tokens"] >= 200000 - 4 * 64 and mixture["tokens_per_s"] > 0
    assert report["manifest"]["shards"] == 2000 and report["manifest"]["current_mb"] < report["manifest"]["v1_mb"]

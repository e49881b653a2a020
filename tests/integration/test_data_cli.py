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
    assert info["vocab_size"] == 258 and info["tokens"]["train"] > 0 and info["documents"]["val"] == 1


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


def test_bench_data_reports_both_rates():
    result = mtp("bench", "data", "--source", JSON_DIR, "--workers", "1", "--seq-len", "64",
                 "--micro-batch", "4", "--stream-tokens", "100000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] > 0 and report["tokenize_tokens_per_s_per_worker"] > 0
    assert report["stream_tokens"] >= 100000 - 4 * 64 and report["stream_tokens_per_s"] > 0

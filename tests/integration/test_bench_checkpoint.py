"""`mtp bench checkpoint` measures a real save and load and projects to 7B/13B (never asserts speed)."""

import json

from tests.integration.conftest import run_mtp


def test_bench_checkpoint_measures_save_load_and_projects(tmp_path):
    out = run_mtp("bench", "checkpoint", "--ranks", "1", "--d-model", "128", "--layers", "3", "--steps", "1",
                  "--repeats", "1", "--tmp", str(tmp_path), "--json", timeout=900)
    result = json.loads(out.stdout)
    (m,) = result["measured"]
    assert m["ranks"] == 1 and m["checkpoint_gb"] > 0
    assert abs(m["rank_gb"] - m["checkpoint_gb"]) < 1e-4  # one rank writes it all (rank 0 adds extra.json)
    for key in ("write_s", "write_plain_s", "xxh3_gbps", "sha256_gbps", "stall_sync_s", "async_blocked_s",
                "verify_s", "load_s"):
        assert m[key] >= 0, key
    assert [p["model"] for p in result["projected"]] == ["7B", "13B"]
    seven, thirteen = result["projected"]
    assert 90 < seven["checkpoint_gb"] < 100 and 175 < thirteen["checkpoint_gb"] < 190  # 14 bytes per parameter
    assert list(tmp_path.iterdir()) == [], "the benchmark's checkpoints are removed"


def test_bench_checkpoint_refuses_bad_rank_counts():
    out = run_mtp("bench", "checkpoint", "--ranks", "0,x", check=False)
    assert out.returncode == 2 and "--ranks must be comma-separated positive rank counts" in out.stderr

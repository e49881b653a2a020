"""`mtp bench train` runs the three variants and reports consistent figures (never asserts speed)."""

import json

from tests.integration.conftest import run_mtp

TINY = ["model.d_model=64", "model.n_layers=5", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
        "model.vocab_size=258", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4"]


def test_bench_train_reports_baseline_mtp_and_matched():
    out = run_mtp("bench", "train", "--steps", "1", "--warmup", "0", "--json", *TINY)
    rows = {r["variant"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"n=1", "n=4", "n=4 matched"}
    assert rows["n=1"]["time_vs_n1"] == 1.0
    assert rows["n=4"]["params"] > rows["n=1"]["params"]
    # Removing 3 trunk layers for 3 extra head layers keeps the size equal.
    assert rows["n=4 matched"]["params"] == rows["n=1"]["params"]
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is None


def test_bench_train_rejects_a_single_head_config():
    out = run_mtp("bench", "train", "--steps", "1", *TINY, "model.n_future=1", check=False)
    assert out.returncode == 2 and "n_future" in out.stderr

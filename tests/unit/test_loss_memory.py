"""`mtp bench loss-memory`: runs end to end and measures what it claims to measure."""

import json

from pretrain.cli import main


def test_small_run_reports_every_case_and_the_naive_memory_blow_up(capsys):
    assert main(["bench", "loss-memory", "--small", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["impl"], r["n_future"]): r for r in result["rows"]}
    assert set(rows) == {("naive", 1), ("fused", 1), ("naive", 4), ("fused", 4)}
    assert all(r["peak_mib"] > 0 and r["seconds"] > 0 for r in rows.values())
    # 4 heads x 1024 tokens x 4096 logits in float32 are 64 MiB before any backward buffer:
    # the naive n=4 step must need far more than the fused one, which holds 256-token chunks.
    assert rows[("naive", 4)]["peak_mib"] > 64
    assert rows[("naive", 4)]["peak_mib"] > 2 * rows[("fused", 4)]["peak_mib"]
    # parity with naive on the same weights and batch, float32 rounding apart; naive has none of its own
    assert all(rows[("fused", n)]["loss_err"] < 1e-5 and rows[("fused", n)]["grad_err"] < 1e-4 for n in (1, 4))
    assert "grad_err" not in rows[("naive", 1)]
    assert [t["ratio"] for t in result["targets"]] == [
        "fused n=4 memory / fused n=1 memory",
        "naive n=4 memory / fused n=4 memory",
        "fused n=4 time / naive n=4 time",
    ]


def test_impossible_shape_is_one_line_and_exit_2(capsys):
    assert main(["bench", "loss-memory", "--tokens", "1000", "--seq-len", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seq-len" in err

"""metrics.jsonl writing and trimming on resume; the progress line; throughput."""

import json
import math

import pytest

from pretrain.metrics import MetricsWriter, StepMetrics, Throughput, format_progress


def metrics(step: int, **kw) -> StepMetrics:
    return StepMetrics(step=step, tokens=step * 4096, loss=3.0, head_losses=[2.5, 2.9, 3.1, 3.3],
                       lr=1e-3, grad_norm=0.7, tokens_per_s=5000.0, **kw)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_flushed_line_per_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = MetricsWriter(str(path))
    writer.write(metrics(1, mfu=0.31, extra={"val_loss": 2.8}))
    # Readable before close: a killed job keeps every finished line.
    assert rows(path) == [{
        "step": 1, "tokens": 4096, "loss": 3.0,
        "loss_head1": 2.5, "loss_head2": 2.9, "loss_head3": 3.1, "loss_head4": 3.3,
        "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 5000.0, "mfu": 0.31, "val_loss": 2.8,
    }]
    writer.write(metrics(2))
    writer.close()
    assert [r["step"] for r in rows(path)] == [1, 2]
    assert "mfu" not in rows(path)[1]


def test_non_finite_loss_is_recorded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(str(path))
    writer.write(StepMetrics(1, 10, math.nan, [math.nan], 1e-3, math.inf, 1.0))
    writer.close()
    assert math.isnan(rows(path)[0]["loss"]) and rows(path)[0]["grad_norm"] == math.inf


def test_resume_drops_steps_past_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(str(path))
    for step in range(1, 8):
        writer.write(metrics(step))
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "loss": 2.')  # the job died mid-line
    writer = MetricsWriter(str(path), resume_step=5)
    writer.write(metrics(6))
    writer.close()
    assert [r["step"] for r in rows(path)] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_starts_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    MetricsWriter(str(path)).close()
    assert path.read_text() == ""


def test_resume_without_a_file_creates_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsWriter(str(path), resume_step=10).close()
    assert path.exists() and path.read_text() == ""


def test_scalars_name_every_head():
    assert [k for k in metrics(1).scalars() if k.startswith("loss_head")] == [f"loss_head{k}" for k in (1, 2, 3, 4)]
    assert "step" not in metrics(1).scalars()


def test_progress_line_matches_the_documented_shape():
    line = format_progress(120, 2000, 2.912, [2.71, 2.88, 3.02, 3.11], 41_234.0, 720.0)
    assert line == "step 120/2000 | loss 2.91 | heads 2.71 2.88 3.02 3.11 | 41k tok/s | eta 12m"


def test_progress_line_single_head_omits_heads_and_stays_plain():
    line = format_progress(1, 10, 5.0, [5.0], 850.0, math.inf)
    assert line == "step 1/10 | loss 5.00 | 850 tok/s | eta ?"
    assert "\r" not in line and "\n" not in line


@pytest.mark.parametrize("tokens_per_s, shown", [(0.0, "0"), (999.0, "999"), (1234.0, "1.2k"), (2.5e6, "2.5M"), (3.1e9, "3.1G")])
def test_throughput_units(tokens_per_s, shown):
    assert f"| {shown} tok/s |" in format_progress(1, 2, 1.0, [1.0], tokens_per_s, 1.0)


@pytest.mark.parametrize("eta_s, shown", [(42, "42s"), (125, "2m"), (3 * 3600 + 5 * 60, "3h05m"), (2 * 86400 + 3 * 3600, "2d03h")])
def test_eta_units(eta_s, shown):
    assert format_progress(1, 2, 1.0, [1.0], 1.0, eta_s).endswith(f"eta {shown}")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_over_a_window():
    clock = FakeClock()
    meter = Throughput(window=2, clock=clock)
    assert meter.tokens_per_s == 0.0 and meter.eta_s(10) == math.inf
    for step, now in enumerate([0.0, 10.0, 12.0, 14.0]):  # step 0 was slow: a warm-up
        clock.now = now
        meter.update(step, step * 1000)
    # The window holds steps 1..3 only: 2000 tokens in 4 s; 2 s per step with 7 steps left.
    assert meter.tokens_per_s == pytest.approx(500.0)
    assert meter.eta_s(10) == pytest.approx(14.0)

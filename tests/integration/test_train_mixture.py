"""`mtp train` on a weighted mixture of two prepared sources: per-source figures, exact resume."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.conftest import run_mtp
from tests.integration.test_train import EXPERIMENT, TINY, metrics

STEPS = ["train.max_steps=6", "train.eval_interval=3", "checkpoint.interval=3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> str:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("mixdata")
    for name in ("json", "email"):
        run_mtp("prepare", "--source", str(stdlib / name), "--tokenizer", "byte", "--out", str(root / name),
                "--val-fraction", "0.3", "--shard-tokens", "100000", "--workers", "1")
    return f"data.sources=[{{dir: {root / 'json'}, weight: 3, name: code}}, {{dir: {root / 'email'}, name: mail}}]"


def train(run_dir: Path, sources: str, *extra: str):
    return run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, *STEPS, sources, f"run.dir={run_dir}", *extra)


def test_mixture_logs_tokens_and_validation_per_source_and_resumes_exactly(sources, tmp_path):
    from data_pipeline.mixture import Mixture

    run_dir = tmp_path / "run"
    train(run_dir, sources, "--stop-after", "3")
    out = train(run_dir, sources)  # resumes from the step-3 checkpoint
    assert "resumed from" in out.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    mixture = Mixture([3.0, 1.0], seed=1234)  # data.seed of configs/tiny-cpu.yaml
    for row in rows:  # exactly the mixture's per-source counts: nothing lost or repeated at the resume
        code, mail = mixture.consumed(row["step"] * 8) * 32
        assert (row["tokens/code"], row["tokens/mail"]) == (code, mail)
        assert row["tokens/code"] + row["tokens/mail"] == row["tokens"]
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    for row in evaluated:
        assert row["val_loss"] == pytest.approx(0.75 * row["val_loss/code"] + 0.25 * row["val_loss/mail"], rel=1e-5)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert {"tokens/code", "tokens/mail", "val_loss/code", "val_loss/mail"} <= set(run.data.metrics)
    cursor = json.loads((run_dir / "checkpoints" / "step_000006" / "extra.json").read_text())["data"]
    assert [s["name"] for s in cursor["sources"]] == ["code", "mail"] and cursor["consumed_samples"] == 6 * 8
    assert [s["samples"] for s in cursor["sources"]] == mixture.consumed(6 * 8).tolist()

"""`mtp bench gpu-check --dry-run`: the one-shot GPU validation runs every stage and writes its reports.

On this CPU machine the stages run at toy sizes and the GPU tests skip; the
point is that the command a GPU session has minutes for works first time.
"""

import json

from tests.integration.conftest import run_mtp


def test_gpu_check_dry_run_runs_every_stage_and_reports(small_corpus, tmp_path):
    out = tmp_path / "gpu-check"
    proc = run_mtp("bench", "gpu-check", "--dry-run", "--out", str(out), "--data", str(small_corpus), "--budget-s",
                   "1400", timeout=1500)
    report = json.loads((out / "gpu-check.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["environment", "tests", "train n1", "train matched", "train n4", "loss-memory vocab 512",
                     "speculative: train", "speculative: export", "speculative: bench"]
    assert all(s["ok"] for s in report["stages"]), proc.stdout
    train = [row for s in report["stages"] if s["name"].startswith("train") for row in s["result"]]
    assert [r["variant"] for r in train] == ["n=1", "n=4 matched", "n=4"]
    assert report["stages"][0]["result"]["device"] == "cpu"
    text = (out / "gpu-check.md").read_text()
    assert "| speculative: bench | yes |" in text and "| n=4 matched |" in text


def test_gpu_check_refuses_a_missing_data_dir(tmp_path):
    proc = run_mtp("bench", "gpu-check", "--dry-run", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "none"),
                   check=False)
    assert proc.returncode == 2 and "holds no prepared data" in proc.stderr


def test_gpu_check_refuses_a_budget_too_small_for_a_stage(tmp_path):
    proc = run_mtp("bench", "gpu-check", "--dry-run", "--out", str(tmp_path / "o"), "--budget-s", "3", check=False)
    assert proc.returncode == 2 and "--budget-s 3 leaves no time for a stage" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

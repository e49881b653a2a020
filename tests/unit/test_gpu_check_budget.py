"""`mtp bench gpu-check` within its budget: stages past it are not started, and the reports say so.

A GPU lease ends a command at its limit; the check must end first, with a
report that tells a stage that failed from one that never ran.
"""

import json
import sys

from pretrain.bench.gpu_check import MIN_STAGE_S, Stage, run_all


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stages_past_the_budget_are_cut_or_not_run_and_reported(tmp_path):
    quick = Stage("quick", python("print('{\"rows\": 1}')"), 60)
    slow = Stage("slow", python("import time; time.sleep(120)"), 60)
    late = Stage("late", python("pass"), 60)
    run_all([quick, slow, late], tmp_path, budget_s=MIN_STAGE_S + 6, dry_run=True)

    assert quick.ran and quick.ok and quick.result == {"rows": 1}
    assert slow.ran and not slow.ok and slow.timeout_s <= MIN_STAGE_S + 6  # its 60 s limit cut to the time left
    assert slow.tail.endswith(f"timed out after {slow.timeout_s} s")
    assert not late.ran and not late.ok
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["ran"] for s in report["stages"]] == [True, True, False] and report["within_budget"] is False
    text = (tmp_path / "gpu-check.md").read_text()
    assert "| quick | yes |" in text and "| slow | NO |" in text and "| late | not run |" in text
    assert "`slow` failed" in text and "`late` failed" not in text
    assert (tmp_path / "logs" / "slow.log").read_text().endswith(f"timed out after {slow.timeout_s} s")

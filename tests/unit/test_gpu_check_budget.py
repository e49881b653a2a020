"""`mtp bench gpu-check` within its budget: stages past it are not started, and the reports say so.

A GPU lease ends a command at its limit; the check must end first, with a
report that tells a stage that failed from one that never ran.
"""

import json
import sys
import time

import psutil

from pretrain.bench.gpu_check import MIN_STAGE_S, Stage, run_all


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stages_past_the_budget_are_cut_or_not_run_and_reported(tmp_path):
    quick = Stage("quick", python("print('{\"rows\": 1}')"), 60)
    # A child of its own, as torchrun's workers, with its output elsewhere: only a group kill ends it.
    slow = Stage("slow", python("import subprocess, sys, time\n"
                                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
                                "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                                "print('child', child.pid, flush=True)\n"
                                "time.sleep(120)"), 60)
    late = Stage("late", python("pass"), 60)
    run_all([quick, slow, late], tmp_path, budget_s=MIN_STAGE_S + 6, dry_run=True)

    assert quick.ran and quick.ok and quick.result == {"rows": 1}
    assert slow.ran and not slow.ok and slow.timeout_s <= MIN_STAGE_S + 6  # its 60 s limit cut to the time left
    assert slow.tail.endswith(f"timed out after {slow.timeout_s} s")
    child = int(slow.tail.split("child ")[1].split()[0])  # what it printed before the limit is kept
    assert not _running(child), "the stage's own children are killed with it"
    assert not late.ran and not late.ok
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["ran"] for s in report["stages"]] == [True, True, False] and report["within_budget"] is False
    text = (tmp_path / "gpu-check.md").read_text()
    assert "| quick | yes |" in text and "| slow | NO |" in text and "| late | not run |" in text
    assert "`slow` failed" in text and "`late` failed" not in text
    assert (tmp_path / "logs" / "slow.log").read_text().endswith(f"timed out after {slow.timeout_s} s")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for PID 1 to reap it), after up to 10 s."""
    for _ in range(100):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.1)
    return True

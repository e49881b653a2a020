"""A rank killed while its background writer writes an asynchronous checkpoint (`mtp bench faults`)."""

import json

from tests.integration.conftest import run_mtp


def test_kill_during_an_asynchronous_save_resumes_from_the_previous_checkpoint(small_corpus, tmp_path):
    proc = run_mtp("bench", "faults", "--data", str(small_corpus), "--drills", "killed-during-async-save",
                   "--workdir", str(tmp_path), "--json", timeout=900, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)
    assert result["exit_code"] == 0, result
    assert result["resumed_at"] == 4, result  # the step-8 checkpoint was never sealed
    assert result["samples_lost"] == 0 and result["samples_repeated"] == 0, result
    assert result["losses_equal"] is True, result
    checkpoints = tmp_path / "killed-during-async-save" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000004", "step_000008", "step_000012"]
    assert run_mtp("checkpoint", "verify", str(checkpoints)).returncode == 0

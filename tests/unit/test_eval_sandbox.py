"""The sandbox for generated code: every kind of escape is stopped, scored, and leaves the host unchanged.

These run real bubblewrap (installed by `make system-deps`) on real
programs; nothing is mocked. Limits are small so the tests are quick, the
wall clock generous so a loaded machine does not turn a CPU-limit case
into a timeout.
"""

import os
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pretrain.errors import UserError
from pretrain.evaluation.problems import load_problems, program
from pretrain.evaluation.sandbox import Limits, Sandbox

REPO = Path(__file__).resolve().parents[2]
LIMITS = Limits(wall_s=60.0, cpu_s=2, memory_mb=512, processes=16, open_files=32, file_mb=1, tmpfs_mb=8)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def host_processes_with(marker: str) -> list[str]:
    """Command lines of live host processes that mention `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and str(os.getpid()) != entry.name:
                found.append(cmdline)
    return found


def test_a_correct_program_passes_and_a_wrong_one_fails(sandbox):
    assert sandbox.run("def f(x):\n    return x + 1\nassert f(1) == 2\n").kind == "passed"
    wrong = sandbox.run("def f(x):\n    return x\nassert f(1) == 2, 'f(1) should be 2'\n")
    assert (wrong.kind, wrong.passed) == ("wrong_answer", False) and "f(1) should be 2" in wrong.detail
    assert sandbox.run("def f(:\n").kind == "syntax_error"
    assert sandbox.run("raise ValueError('nope')\n").kind == "exception"


def test_no_network(sandbox):
    for target in ("('1.1.1.1', 80)", "('127.0.0.1', 22)", "('pypi.org', 443)"):
        outcome = sandbox.run(f"import socket\nsocket.create_connection({target}, timeout=5)\n")
        assert outcome.kind == "network_denied", (target, outcome)


def test_writes_outside_its_directory_fail_and_change_nothing(sandbox, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (canary, tmp_path / "new.txt", REPO / "pwned.txt", Path("/usr/pwned"), Path("/tmp/pwned")):
        outcome = sandbox.run(f"open({str(target)!r}, 'w').write('pwned')\n")
        assert not outcome.passed and outcome.kind in ("permission_denied", "exception"), (target, outcome)
    assert sandbox.run("import os\nos.remove('/usr/bin/env')\n").kind == "permission_denied"
    assert canary.read_text() == "untouched" and sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (REPO / "pwned.txt").exists() and not Path("/usr/pwned").exists() and Path("/usr/bin/env").exists()
    assert not Path("/tmp/pwned").exists()
    # its own directory is writable, size-limited, and gone afterwards
    assert sandbox.run("open('/work/a', 'w').write('x' * 1000)\nassert open('/work/a').read() == 'x' * 1000\n").passed
    assert sandbox.run("import os\nassert os.listdir('/work') == []\n").passed
    assert sandbox.run("open('/work/big', 'w').write('x' * 2**21)\n").kind == "file_limit"


def test_it_sees_nothing_of_the_host(sandbox):
    outcome = sandbox.run(
        "import os\n"
        "assert not os.path.exists('/work/wt') and not os.path.exists('/etc/passwd'), os.listdir('/')\n"
        f"assert not os.path.exists({str(REPO)!r})\n"
        "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PWD'}, dict(os.environ)\n"
        "assert os.getpid() < 10, os.getpid()\n"  # its own PID namespace
        "assert os.getuid() != 0\n"
    )
    assert outcome.passed, outcome


def test_a_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind(sandbox):
    marker = f"forkbomb-{uuid.uuid4().hex}"
    outcome = sandbox.run(f"import os, time\n_ = {marker!r}\nwhile True:\n    if os.fork() == 0:\n        time.sleep(600)\n")
    assert outcome.kind == "process_limit", outcome
    assert host_processes_with(marker) == []


def test_unbounded_memory_hits_the_memory_limit(sandbox):
    assert sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(2**24))\n").kind == "memory_limit"


def test_an_endless_loop_hits_the_cpu_limit(sandbox):
    outcome = sandbox.run("while True:\n    pass\n")
    assert outcome.kind == "cpu_limit", outcome


def test_the_wall_clock_kills_the_whole_group(tmp_path):
    marker = f"sleeper-{uuid.uuid4().hex}"
    quick = Sandbox(Limits(wall_s=3.0, cpu_s=2))
    code = ("import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}], start_new_session=True)\n"
            "time.sleep(600)\n")
    outcome = quick.run(code)
    assert outcome.kind == "timeout" and outcome.seconds < 60, outcome
    assert host_processes_with(marker) == []


def test_too_many_open_files(sandbox):
    assert sandbox.run("files = [open('/dev/null') for _ in range(1000)]\n").kind == "file_limit"


def test_killing_its_parent_is_stopped(sandbox):
    outcome = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(2)\n")
    # as root the program runs as uid 65534 and may not signal the monitor; unprivileged, the
    # monitor dies and bwrap tears the sandbox down: either way the program is stopped, not passed
    assert outcome.kind == ("permission_denied" if os.geteuid() == 0 else "killed"), outcome
    sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\n")  # every process it may signal: none outside
    assert sandbox.run("assert 1 + 1 == 2\n").passed  # and the next program runs as usual


def test_exiting_early_is_not_passing(sandbox):
    assert sandbox.run("import sys\nsys.exit(0)\nassert False\n").kind == "exit"
    assert sandbox.run("import os\nos._exit(0)\n").kind == "exit"


def test_output_is_capped(sandbox):
    outcome = sandbox.run("import sys\nsys.stdout.write('x' * 50_000_000)\nassert False\n")
    assert outcome.kind == "wrong_answer" and len(outcome.detail) < 2000


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root to become uid 65534")
def test_unprivileged_users_get_the_same_sandbox(tmp_path):
    """Run as uid 65534 (how a cluster user runs it): bwrap then builds a user namespace itself."""
    script = ("from pretrain.evaluation.sandbox import Sandbox, Limits\n"
              "s = Sandbox(Limits(wall_s=60, cpu_s=2, processes=16), python='/usr/bin/python3')\n"
              "print(s.run('import os\\nwhile True:\\n    os.fork()\\n').kind,"
              " s.run('import socket\\nsocket.create_connection((\"1.1.1.1\", 80))').kind,"
              " s.run(\"open('/usr/x', 'w')\").kind, s.run('assert True').kind)\n")
    out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3",
                          "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["process_limit", "network_denied", "permission_denied", "passed"], out.stderr


def test_the_canonical_humaneval_solutions_all_pass_and_broken_ones_fail(sandbox):
    problems = load_problems()
    assert len(problems) == 164
    runner = Sandbox(Limits())  # the defaults `mtp eval` uses
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda p: runner.run(program(p, p.canonical_solution)), problems))
    failed = [(p.task_id, o.kind, o.detail) for p, o in zip(problems, outcomes) if not o.passed]
    assert failed == []
    # has_close_elements answered by its canonical loop with the comparison reversed
    reversed_check = problems[0].canonical_solution.replace("distance < threshold", "distance > threshold")
    assert reversed_check != problems[0].canonical_solution
    assert runner.run(program(problems[0], reversed_check)).kind == "wrong_answer"
    assert runner.run(program(problems[1], "    return []\n")).kind == "wrong_answer"


def test_a_missing_bwrap_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"bubblewrap \(bwrap\).*make system-deps"):
        Sandbox(LIMITS)


def test_the_child_script_needs_nothing_but_the_standard_library():
    source = (REPO / "pretrain" / "evaluation" / "sandbox_child.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names)

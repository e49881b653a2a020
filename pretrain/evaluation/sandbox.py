"""Running untrusted generated programs: bubblewrap namespaces, resource limits, a wall clock that kills the group.

Generated code is never executed in this process or with its rights. Each
program runs under bubblewrap (`bwrap`, Debian package `bubblewrap`, the
sandbox Flatpak uses; installed by `make system-deps`), chosen over a
hand-written namespace setup because getting mounts, namespaces and
privilege drops right is its whole job:

- its own PID, network (no interfaces but a downed loopback: no network at
  all), IPC, UTS and cgroup namespaces, and a new session (`setsid`), so
  it has its own process group and sees no process outside;
- a read-only view of /usr (and the interpreter's own prefix) and nothing
  else of the host: no home directories, no project, no /etc, no /tmp of
  the host. The root is read-only; the only writable place is a fresh
  size-limited tmpfs at /work, gone when the program ends;
- an environment holding PATH, HOME, TMPDIR and LANG only (`--clearenv`);
- limits set by the trusted monitor inside (`sandbox_child.py`) on CPU
  seconds, address space, processes, open files and file size; when the
  evaluator runs as root, the program drops to uid 65534 (the kernel
  does not enforce the process limit on root);
- a wall-clock timeout after which the whole process group is killed:
  bwrap's own children die with it (`--die-with-parent`), and the PID
  namespace takes every process the program forked down with its init.
"""

import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.errors import UserError

CHILD = Path(__file__).with_name("sandbox_child.py")
KINDS = ("passed", "wrong_answer", "syntax_error", "exception", "timeout", "cpu_limit", "memory_limit",
         "process_limit", "file_limit", "network_denied", "permission_denied", "exit", "killed", "sandbox_error")
INSTALL_HINT = "install bubblewrap: `make system-deps` (or `apt-get install bubblewrap`)"
SANDBOX_ROOTS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class Limits:
    """What one program may use; the defaults suit HumanEval-style unit tests."""

    wall_s: float = 20.0  # wall-clock seconds before the whole group is killed
    cpu_s: int = 10  # CPU seconds (SIGXCPU, then SIGKILL)
    memory_mb: int = 1024  # address space
    processes: int = 32  # processes and threads of the sandbox user
    open_files: int = 64
    file_mb: int = 16  # largest file it may write
    tmpfs_mb: int = 64  # size of its writable /work
    output_kb: int = 16  # program output kept for the error message


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    detail: str  # the exception or signal, and the end of the program's output
    seconds: float

    @property
    def passed(self) -> bool:
        return self.kind == "passed"


class Sandbox:
    """Runs Python programs in bubblewrap; `run(program)` is safe to call from several threads."""

    def __init__(self, limits: Limits = Limits(), python: str | None = None):
        self.limits = limits
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise UserError(f"the sandbox for generated code needs bubblewrap (bwrap), which is not on PATH; {INSTALL_HINT}")
        self.python = os.path.realpath(python or sys.executable)
        self.privileged = os.geteuid() == 0
        self._check()

    def run(self, program: str) -> Outcome:
        """Execute `program` to completion, a limit or the wall-clock timeout."""
        nonce = secrets.token_hex(16)
        start = time.monotonic()
        proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        cap = self.limits.output_kb * 1024
        readers = [_Drain(proc.stdout, cap), _Drain(proc.stderr, cap)]
        try:
            proc.stdin.write(json.dumps({"program": program, "nonce": nonce}).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=self.limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
        report, output = (r.result() for r in readers)
        seconds = time.monotonic() - start
        if timed_out:
            return Outcome("timeout", f"no result within {self.limits.wall_s:g} s wall clock{_tail(output)}", seconds)
        return self._outcome(report, output, proc.returncode, nonce, seconds)

    def _outcome(self, report: bytes, output: bytes, returncode: int, nonce: str, seconds: float) -> Outcome:
        for line in reversed(report.decode("utf-8", "replace").splitlines()):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("nonce") == nonce and item.get("kind") in KINDS:
                return Outcome(item["kind"], str(item.get("detail", "")) + _tail(output), seconds)
        if returncode > 128:  # the monitor itself was killed, e.g. by a program that signalled its parent
            return Outcome("killed", f"the sandbox was killed by {_signal_name(returncode - 128)}{_tail(output)}", seconds)
        return Outcome("sandbox_error", f"bwrap exited {returncode} without a report{_tail(output)}", seconds)

    def _command(self) -> list[str]:
        limits = {k: v for k, v in asdict(self.limits).items() if k not in ("wall_s", "tmpfs_mb", "output_kb")}
        return [
            self.bwrap, *self._namespaces(), "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work",
            "--setenv", "TMPDIR", "/work", "--setenv", "LANG", "C.UTF-8",
            *self._filesystem(),
            "--", self.python, "-I", "-S", "-B", "/sandbox/child.py", json.dumps(limits),
        ]

    def _namespaces(self) -> list[str]:
        spaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if self.privileged:
            # Real root outside: no user namespace; every capability dropped but the two the
            # monitor's child needs to become uid 65534.
            return [*spaces, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return [*spaces, "--unshare-user", "--disable-userns"]

    def _filesystem(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for root in SANDBOX_ROOTS:
            if os.path.islink(root):
                args += ["--symlink", os.readlink(root), root]
            elif os.path.isdir(root):
                args += ["--ro-bind", root, root]
        made: set[str] = set()
        for prefix in sorted(self._python_dirs()):
            # bwrap copies the host's mode onto the parents it creates (/root is 0700): open them
            for parent in reversed(Path(prefix).parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", prefix, prefix]
        return [
            *args, "--ro-bind", str(CHILD), "/sandbox/child.py",
            "--proc", "/proc", "--dev", "/dev", "--dir", "/tmp",
            "--perms", "1777", "--size", str(self.limits.tmpfs_mb * 2**20), "--tmpfs", "/work",
            "--remount-ro", "/", "--chdir", "/work",
        ]

    def _python_dirs(self) -> set[str]:
        """The interpreter's installation, when it lies outside /usr (pyenv, conda, a module system)."""
        found = set()
        for path in {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(self.python))}:
            real = os.path.realpath(path)
            if not (real == "/usr" or real.startswith("/usr/")) and os.path.isdir(real):
                found.add(real)
        return found

    def _check(self) -> None:
        """Run a trivial program once, so a sandbox that cannot start fails here with the fix named."""
        outcome = self.run("import sys\nassert sys.flags.isolated\n")
        if outcome.passed:
            return
        problem = outcome.detail.strip().splitlines()[-1] if outcome.detail.strip() else outcome.kind
        raise UserError(
            f"the bubblewrap sandbox does not start here ({problem}); it needs user namespaces when not run as "
            "root (enable them: sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu "
            "kernel.apparmor_restrict_unprivileged_userns=0) or a setuid bwrap; "
            f"if bwrap is missing or broken, {INSTALL_HINT}"
        )


class _Drain:
    """Reads a pipe to its end in a thread, keeping the first `cap` bytes (a program may print gigabytes)."""

    def __init__(self, pipe, cap: int):
        self.pipe = pipe
        self.cap = cap
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.pipe:
            for chunk in iter(lambda: self.pipe.read1(65536), b""):
                if len(self.data) < self.cap:
                    self.data += chunk[: self.cap - len(self.data)]

    def result(self) -> bytes:
        self.thread.join()
        return bytes(self.data)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's whole process group (its session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError as err:
        if err.errno != errno.ESRCH:
            raise
    proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(output: bytes) -> str:
    text = output.decode("utf-8", "replace").strip()
    return f" | output: {text[-400:]}" if text else ""

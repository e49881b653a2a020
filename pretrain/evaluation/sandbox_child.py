"""The trusted half of the sandbox: runs INSIDE bubblewrap, starts the untrusted program and reports on it.

Executed by the sandbox's Python (`python -I -S -B`, standard library only,
no access to this project). It reads one request, `{"program": ..., "nonce":
...}`, from stdin and writes one JSON report line, carrying the nonce, to
its original stdout; the program's own stdout is redirected to stderr, so
whatever it prints can never be taken for a report.

The program runs in a forked child (this process stays its parent and
monitor). The child lowers its resource limits (CPU seconds, address
space, processes, open files, file size, no core dumps), and when the
sandbox was started by root it drops to an unprivileged uid first, so the
process limit is enforced (the kernel exempts root from it) and it cannot
signal the monitor. The child then compiles and executes the program and
writes its verdict (an exception's kind) into a pipe the monitor reads
after the child has exited; signals that killed the child (CPU limit,
SIGKILL) are classified by the monitor from the wait status.

Error kinds: passed, wrong_answer (AssertionError), syntax_error,
exception, timeout (set by the host's wall clock), cpu_limit,
memory_limit, process_limit, file_limit, network_denied,
permission_denied, exit (ended before its tests finished), killed.
"""

import errno
import json
import os
import resource
import signal
import socket
import sys

UNPRIVILEGED_UID = 65534  # `nobody` on Debian and most distributions
NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EAFNOSUPPORT,
                  errno.EADDRNOTAVAIL, errno.ENETDOWN}
PERMISSION_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
DETAIL_CHARS = 300


def main() -> None:
    limits = json.loads(sys.argv[1])
    request = json.loads(sys.stdin.read())
    report_fd = os.dup(1)
    os.dup2(2, 1)  # the program's stdout joins its stderr
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(report_fd)
        _run_program(request["program"], limits, write_end)
    os.close(write_end)
    _, status, usage = os.wait4(pid, 0)
    verdict = _read_available(read_end)
    report = _outcome(verdict, status, usage, limits)
    report["nonce"] = request["nonce"]
    os.write(report_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)


def _run_program(program: str, limits: dict, verdict_fd: int) -> None:
    """In the child: limits, privileges, then the program; never returns."""
    _set_limits(limits)
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(UNPRIVILEGED_UID)
        os.setuid(UNPRIVILEGED_UID)
    me = os.getpid()
    try:
        code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError) as err:
        _finish(verdict_fd, me, "syntax_error", err)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as err:  # noqa: BLE001 -- every way the program can fail is a verdict
        try:
            kind = _classify(err)
        except BaseException:  # noqa: BLE001 -- e.g. a program that replaced builtins
            kind = "exception"
        _finish(verdict_fd, me, kind, err)
    _finish(verdict_fd, me, "passed", None)


def _set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    memory = int(limits["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["processes"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limits["open_files"]),) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limits["file_mb"]) * 2**20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises EFBIG instead of killing


def _classify(err: BaseException) -> str:
    if isinstance(err, AssertionError):
        return "wrong_answer"
    if isinstance(err, MemoryError):
        return "memory_limit"
    if isinstance(err, SystemExit):
        return "exit"
    if isinstance(err, RuntimeError) and "thread" in str(err):
        return "process_limit"  # "can't start new thread"
    if isinstance(err, OSError):
        return _os_error_kind(err)
    return "exception"


def _os_error_kind(err: OSError) -> str:
    if isinstance(err, socket.gaierror) or err.errno in NETWORK_ERRNOS:
        return "network_denied"
    if err.errno == errno.EAGAIN:
        return "process_limit"  # fork() beyond RLIMIT_NPROC
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return "file_limit"
    if err.errno == errno.EFBIG:
        return "file_limit"
    if err.errno in PERMISSION_ERRNOS:
        return "permission_denied"
    return "exception"


def _finish(fd: int, me: int, kind: str, err: BaseException | None) -> None:
    """Write the verdict and exit; processes the program forked just exit."""
    if os.getpid() != me:
        os._exit(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- the program may have closed or replaced them
            pass
    detail = "" if err is None else f"{type(err).__name__}: {err}"[:DETAIL_CHARS]
    try:
        os.write(fd, json.dumps({"kind": kind, "detail": detail}).encode())
    except OSError:
        pass
    os._exit(0 if kind == "passed" else 1)


def _read_available(fd: int) -> dict | None:
    """The child's verdict, read without waiting for processes it left behind to close the pipe."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < 65536:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    try:
        verdict = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) and isinstance(verdict.get("kind"), str) else None


def _outcome(verdict: dict | None, status: int, usage, limits: dict) -> dict:
    cpu_used = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= float(limits["cpu_s"])):
            return {"kind": "cpu_limit", "detail": f"{cpu_used:.1f} CPU seconds"}
        return {"kind": "killed", "detail": f"killed by {signal.Signals(sig).name}"}
    if verdict is not None:
        passed = verdict["kind"] == "passed" and os.WEXITSTATUS(status) == 0
        kind = verdict["kind"] if passed or verdict["kind"] != "passed" else "exit"
        return {"kind": kind, "detail": str(verdict.get("detail", ""))[:DETAIL_CHARS]}
    return {"kind": "exit", "detail": f"exited with status {os.WEXITSTATUS(status)} before its tests finished"}


if __name__ == "__main__":
    main()

"""Run untrusted model-written programs so that nothing they do reaches the evaluator.

Every run is a fresh ``python3 -I -S -B`` process started from a scrubbed environment (no
credentials, tokens or ``AWS_*`` — only PATH, LANG and HOME), in its own session, with an
empty temporary working directory and stdin/stdout/stderr as files. Inside, the boot code
(`_sandbox_boot.py`) applies resource limits, namespaces, an unprivileged uid, Landlock and an
audit hook before the program's first line (see that module for the layers). Out here we
enforce the wall-clock timeout by killing the whole process group, cap how much output we
read back, and delete the working directory afterwards.

The configuration that works on this host (which interpreter an unprivileged uid can read,
whether namespaces are permitted) is probed once per process and then reused.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import math
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import _sandbox_boot

log = logging.getLogger(__name__)

_BOOT_SOURCE = Path(_sandbox_boot.__file__).read_text()

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``max_file_bytes`` also caps stdout and stderr (they are files)."""

    wall_seconds: float = 10.0
    cpu_seconds: float | None = None  # default: the wall-clock limit
    memory_bytes: int = 1 << 30
    max_file_bytes: int = 16 << 20
    max_processes: int = 32
    max_open_files: int = 64


@dataclass(frozen=True)
class RunResult:
    status: Status
    exit_code: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    protections: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Policy:
    python: str
    uid: int | None
    gid: int | None
    namespaces: bool
    landlock: bool
    audit_hook: bool = True  # tests turn it off to check the kernel layers on their own


_policy_lock = threading.Lock()
_policy_cache: _Policy | None = None

#: Environment of every sandboxed program: nothing inherited from the evaluator.
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def _world_usable(path: str) -> bool:
    """Whether an unprivileged user can reach and execute ``path`` (every parent searchable)."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _candidate_pythons() -> list[str]:
    seen: list[str] = []
    for c in (
        getattr(sys, "_base_executable", None),
        sys.executable,
        "/usr/local/bin/python3",
        "/usr/bin/python3",
        shutil.which("python3", path=_CLEAN_ENV["PATH"]),
    ):
        if c and os.path.exists(c) and os.path.realpath(c) not in seen:
            seen.append(os.path.realpath(c))
    return seen


def _nobody() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _probe(policy: _Policy) -> bool:
    try:
        r = _run(policy, "import json, math, sys\nprint(json.dumps([math.pi]))", "", SandboxLimits(wall_seconds=20))
    except OSError:
        return False
    return r.ok and r.stdout.startswith("[3.14")


def host_policy() -> _Policy:
    """The strongest configuration that runs a trivial program here (probed once)."""
    global _policy_cache
    with _policy_lock:
        if _policy_cache is not None:
            return _policy_cache
        pythons = _candidate_pythons()
        ids = _nobody() if os.geteuid() == 0 else None
        tries: list[_Policy] = []
        if ids is not None:
            tries += [_Policy(p, ids[0], ids[1], True, True) for p in pythons if _world_usable(p)]
        tries += [_Policy(p, None, None, ns, True) for ns in (True, False) for p in pythons[:1]]
        tries.append(_Policy(pythons[0], None, None, False, False))
        for policy in tries:
            if _probe(policy):
                _policy_cache = policy
                log.info("sandbox: %s", policy)
                return policy
        raise RuntimeError(f"the code sandbox cannot start any Python interpreter (tried {pythons})")


def describe() -> dict[str, Any]:
    """The confinement this host gives programs (interpreter, uid, namespaces, Landlock ABI,
    audit hook), as reported from inside a trivial run; recorded with code-benchmark results."""
    policy = host_policy()
    r = _run(policy, "pass", "", SandboxLimits(wall_seconds=20))
    return {"python": policy.python, **r.protections}


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None) -> RunResult:
    """Run one Python program in a fresh sandbox and return what it printed and how it ended."""
    return _run(host_policy(), source, stdin, limits or SandboxLimits())


def _run(policy: _Policy, source: str, stdin: str, limits: SandboxLimits) -> RunResult:
    private = Path(tempfile.mkdtemp(prefix="bm-sbx-io-"))  # 0700: only the evaluator reads it
    work = Path(tempfile.mkdtemp(prefix="bm-sbx-"))
    try:
        if policy.uid is not None and policy.gid is not None:
            os.chown(work, policy.uid, policy.gid)
        (private / "solution.py").write_text(source)
        (private / "stdin").write_text(stdin)
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else limits.wall_seconds
        boot_policy = {
            "program": str(private / "solution.py"),
            "workdir": str(work),
            "uid": policy.uid,
            "gid": policy.gid,
            "namespaces": policy.namespaces,
            "landlock": policy.landlock,
            "audit_hook": policy.audit_hook,
            "cpu_seconds": max(1, math.ceil(cpu)),
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.max_file_bytes,
            "open_files": limits.max_open_files,
            # Without a PID namespace we cannot reap what a program forks: allow none.
            "processes": limits.max_processes if policy.namespaces else 0,
            "read_paths": _read_paths(policy.python),
            "write_paths": [str(work), "/dev/null"],
        }
        report_r, report_w = os.pipe()
        os.set_blocking(report_r, False)
        boot_policy["report_fd"] = report_w
        start = time.monotonic()
        with (
            open(private / "stdin", "rb") as fin,
            open(private / "stdout", "wb") as fout,
            open(private / "stderr", "wb") as ferr,
        ):
            try:
                proc = subprocess.Popen(
                    [policy.python, "-I", "-S", "-B", "-c", _BOOT_SOURCE, marshal.dumps(boot_policy, 2).hex()],
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=work,
                    env={**_CLEAN_ENV, "HOME": str(work), "TMPDIR": str(work)},
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(report_w,),
                )
            finally:
                os.close(report_w)
            timed_out = not _wait_exit(proc, limits.wall_seconds)
            _kill_group(proc.pid)
            proc.wait()
        wall = time.monotonic() - start
        protections = _read_report(report_r)
        out_size = (private / "stdout").stat().st_size
        stdout = _read_capped(private / "stdout", limits.max_file_bytes)
        stderr = _read_capped(private / "stderr", 64 * 1024)
        code = proc.returncode
        status = _classify(code, timed_out, stderr, out_size >= limits.max_file_bytes)
        return RunResult(status, code, stdout, stderr, wall, protections)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        _remove_tree(work)


def _read_report(fd: int) -> dict[str, Any]:
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:  # the program died before the boot code reported
        data = b""
    finally:
        os.close(fd)
    try:
        report = marshal.loads(data) if data else {}
    except (ValueError, EOFError, TypeError):
        return {}
    return report if isinstance(report, dict) else {}


def _read_paths(python: str) -> list[str]:
    """What a sandboxed interpreter may read: its own installation and system libraries."""
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))
    paths = [os.path.dirname(real), prefix, "/usr", "/lib", "/lib64", "/lib32", "/bin"]
    paths += ["/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom"]
    return list(dict.fromkeys(paths))


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the process to exit within ``timeout``; False on timeout.

    A pidfd wakes us the moment the child exits. ``Popen.wait(timeout)`` polls with sleeps
    of up to 50 ms, which alone would double the per-test overhead.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_capped(path: Path, cap: int) -> str:
    with path.open("rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def _classify(code: int | None, timed_out: bool, stderr: str, output_full: bool) -> Status:
    if timed_out:
        return "timeout"
    if code == 0:
        return "ok"
    sig = -code if code is not None and code < 0 else (code - 128 if code is not None and code > 128 else 0)
    if sig in {signal.SIGXCPU, signal.SIGKILL}:
        return "timeout"
    if sig == signal.SIGXFSZ or output_full or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr:
        return "memory"
    return "error"


def _remove_tree(path: Path) -> None:
    """Delete a working directory even if the program made parts of it unreadable."""

    def fix(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)

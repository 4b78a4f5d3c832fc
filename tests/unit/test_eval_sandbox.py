"""The code sandbox: ordinary programs, and hostile ones that must be contained.

Each hostile program must end as a failure while the evaluator (this process), the file
system outside the sandbox and the network stay untouched. Where the kernel layers are
available (namespaces, Landlock) they are also checked *without* the Python audit hook, so a
program that gets past the hook is still contained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchmerge_trainer.evaluate import sandbox
from branchmerge_trainer.evaluate.benchmarks import run_tests
from branchmerge_trainer.evaluate.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(wall_seconds=2.0, memory_bytes=256 << 20, max_file_bytes=1 << 20)


def _kernel_only() -> sandbox._Policy:
    return dataclasses.replace(sandbox.host_policy(), audit_hook=False)


def _hook_only() -> sandbox._Policy:
    """The weakest configuration: what a container that refuses namespaces and Landlock and
    runs us as root would leave (resource limits + the audit hook)."""
    return dataclasses.replace(sandbox.host_policy(), uid=None, gid=None, namespaces=False, landlock=False)


POLICIES = {"host": sandbox.host_policy, "kernel_only": _kernel_only, "hook_only": _hook_only}


def test_a_program_reads_stdin_and_writes_stdout() -> None:
    r = run_program("a, b = map(int, input().split())\nprint(a + b)", "2 3\n", FAST)
    assert r.ok and r.stdout == "5\n" and r.exit_code == 0


def test_crash_is_an_error_with_the_traceback() -> None:
    r = run_program("raise ValueError('boom')", "", FAST)
    assert r.status == "error" and "ValueError: boom" in r.stderr


def test_syntax_error_is_an_error() -> None:
    assert run_program("def f(:\n", "", FAST).status == "error"


def test_nonzero_exit_is_an_error() -> None:
    assert run_program("import sys; sys.exit(3)", "", FAST).exit_code == 3


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    r = run_program("while True: pass", "", SandboxLimits(wall_seconds=1.0))
    assert r.status == "timeout"
    assert time.monotonic() - start < 5


def test_sleeping_program_is_killed_at_the_wall_clock_limit() -> None:
    r = run_program("import time; time.sleep(60)", "", SandboxLimits(wall_seconds=0.5))
    assert r.status == "timeout" and r.wall_seconds < 3


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"SECRET-{uuid.uuid4()}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    prog = (
        "import os, glob\n"
        "print(sorted(os.environ))\n"
        "print(any('SECRET' in v for v in os.environ.values()))\n"
        "found = []\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        found.append(open(p, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print(b'SECRET-' in b''.join(found))\n"
    )
    r = run_program(prog, "", FAST)
    assert r.ok, r.stderr
    assert secret not in r.stdout and secret not in r.stderr
    names, in_env, in_proc = r.stdout.splitlines()
    assert not any(k.startswith("AWS") or "TOKEN" in k for k in eval(names))
    assert in_env == "False" and in_proc == "False"


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    s.settimeout(0.2)
    yield s, s.getsockname()[1]
    s.close()


def _no_connection(s: socket.socket) -> bool:
    try:
        s.accept()
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("policy", ["host", "hook_only"])
def test_opening_a_socket_fails(listener: tuple[socket.socket, int], policy: str) -> None:
    s, port = listener
    prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    r = sandbox._run(POLICIES[policy](), prog, "", FAST)
    assert not r.ok and "connected" not in r.stdout
    assert _no_connection(s)


def test_network_is_unreachable_even_past_the_audit_hook(listener: tuple[socket.socket, int]) -> None:
    policy = _kernel_only()
    if not policy.namespaces and not policy.landlock:
        pytest.skip("neither network namespaces nor Landlock are available here")
    s, port = listener
    prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    r = sandbox._run(policy, prog, "", FAST)
    assert not r.ok and "connected" not in r.stdout
    assert r.protections.get("netns") or r.protections.get("landlock_abi", 0) >= 4
    assert _no_connection(s)


@pytest.mark.parametrize("policy", ["host", "kernel_only", "hook_only"])
def test_writing_outside_the_working_directory_fails(policy: str) -> None:
    target = Path("/tmp") / f"bm-escape-{uuid.uuid4().hex}"
    prog = (
        f"open({str(target)!r}, 'w').write('pwned')\n"
        "print('wrote')\n"
    )
    chosen = POLICIES[policy]()
    if policy == "kernel_only" and not chosen.landlock and chosen.uid is None:
        pytest.skip("no kernel file-system confinement here (Landlock or an unprivileged uid)")
    r = sandbox._run(chosen, prog, "", FAST)
    assert not r.ok and "wrote" not in r.stdout
    assert not target.exists()


def test_writing_inside_the_working_directory_works_and_is_removed() -> None:
    r = run_program("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())", "", FAST)
    assert r.ok
    assert not Path(r.stdout.strip()).exists()  # the working directory is gone afterwards


def test_each_run_starts_with_an_empty_directory() -> None:
    r = run_program("import os; print(os.listdir('.'))", "", FAST)
    assert r.stdout.strip() == "[]"


def test_memory_bomb_is_contained() -> None:
    r = run_program("x = bytearray(8 * 1024**3)\nprint(len(x))", "", FAST)
    assert r.status == "memory"
    r = run_program("chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)", "", FAST)
    assert r.status in {"memory", "timeout"}


def test_huge_output_is_capped() -> None:
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "", FAST)
    assert r.status == "output_limit"
    assert len(r.stdout) <= FAST.max_file_bytes


@pytest.mark.parametrize("policy", ["host", "kernel_only", "hook_only"])
def test_fork_bomb_is_contained(policy: str) -> None:
    prog = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    chosen = POLICIES[policy]()
    if policy == "kernel_only" and not chosen.namespaces:
        pytest.skip("without a PID namespace the audit hook is what stops forks")
    r = sandbox._run(chosen, prog, "", SandboxLimits(wall_seconds=1.5, max_processes=16))
    assert not r.ok
    assert _sandbox_processes_gone()  # everything it forked died with it


def test_daemonised_child_dies_with_the_sandbox() -> None:
    policy = sandbox.host_policy()
    if not policy.namespaces:
        pytest.skip("needs a PID namespace; otherwise the audit hook refuses the fork")
    prog = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leaves the process group the evaluator kills\n"
        "    time.sleep(30)\n"
        "print('parent done')\n"
    )
    r = run_program(prog, "", FAST)
    assert r.ok
    assert _sandbox_processes_gone()


def test_signalling_other_processes_fails() -> None:
    r = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('sent')", "", FAST)
    assert not r.ok and "sent" not in r.stdout  # and we are still alive to check


def test_the_audit_hook_cannot_be_rewritten() -> None:
    prog = (
        "import gc, socket\n"
        "hooks = [o for o in gc.get_objects() if getattr(o, '__name__', '') == 'hook']\n"
        "for h in hooks:\n"
        "    h.__code__ = (lambda event, args: None).__code__\n"
        "socket.socket()\n"
        "print('escaped')\n"
    )
    r = run_program(prog, "", FAST)
    assert not r.ok and "escaped" not in r.stdout


def test_foreign_code_through_ctypes_is_refused() -> None:
    r = run_program("import ctypes\nprint(ctypes.CDLL(None).getpid())", "", FAST)
    assert not r.ok


def test_code_grading_with_stdin_tests() -> None:
    fields = {
        "tests": [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10\n"}],
        "entry_point": None,
    }
    assert run_tests("print(int(input()) * 2)", fields, FAST) == (True, "passed 2 tests")
    ok, detail = run_tests("print(int(input()) + 2)", fields, FAST)  # right on test 0 only
    assert not ok and detail == "test 1: wrong answer"
    ok, detail = run_tests("print(1/0)", fields, FAST)
    assert not ok and "ZeroDivisionError" in detail
    ok, detail = run_tests("while True: pass", fields, SandboxLimits(wall_seconds=0.5))
    assert not ok and "timeout" in detail


def test_code_grading_with_a_function_entry_point() -> None:
    fields = {"tests": [{"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]"}], "entry_point": "scale"}
    assert run_tests("def scale(xs, k):\n    return [x * k for x in xs]", fields, FAST)[0]
    assert not run_tests("def scale(xs, k):\n    return xs", fields, FAST)[0]
    solution = "class Solution:\n    def scale(self, xs, k):\n        return [x * k for x in xs]"
    assert run_tests(solution, fields, FAST)[0]


def test_code_grading_with_test_code() -> None:
    check = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    fields = {"tests": check, "entry_point": "square"}
    assert run_tests("def square(x):\n    return x * x", fields, FAST)[0]
    assert not run_tests("def square(x):\n    return 2 * x", fields, FAST)[0]
    asserts = {"tests": "assert square(3) == 9\n", "entry_point": None}
    assert run_tests("def square(x):\n    return x * x", asserts, FAST)[0]


def _sandbox_processes_gone(wait: float = 2.0) -> bool:
    """No process is left running the sandbox boot code (its source is on the command line)."""
    deadline = time.monotonic() + wait
    while True:
        alive = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    alive += b"def become_reaped" in Path(f"/proc/{pid}/cmdline").read_bytes()
        if alive == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)

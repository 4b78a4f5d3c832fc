"""Runs *inside* the sandbox process: confine itself, then execute the untrusted program.

`sandbox.py` starts ``python3 -I -S -B -c <this file's source> <policy>`` (policy: hex of marshal) with a scrubbed
environment, an empty working directory and stdin/stdout/stderr redirected to files. This
code then applies every confinement layer the kernel allows, strongest first, and never
imports anything outside the standard library (the sandbox interpreter has no site-packages):

1. resource limits (CPU seconds, address space, file size — which also caps stdout/stderr,
   since they are files — open files, processes, no core dumps);
2. new network, PID and IPC namespaces (a user namespace too when not root), so the program
   has no network interface at all and everything it forks dies with it;
3. as root: drop to an unprivileged uid/gid (root is exempt from RLIMIT_NPROC);
4. Landlock: writes only under the working directory, reads only of the interpreter's files
   and system libraries, no TCP, no signals or abstract sockets outside the sandbox;
5. an audit hook refusing sockets, ctypes, signals to others, file changes outside the
   working directory and — when there is no PID namespace to reap them — new processes.

Layers 1–4 are enforced by the kernel; 5 is a Python-level backstop for kernels or
container runtimes that refuse namespaces or Landlock. What was applied is written (marshal)
to the inherited report descriptor before the program starts, so the caller can report it.
"""

from __future__ import annotations

import marshal
import os
import resource
import sys

# No `typing` or `json` at run time: every import here is paid once per test case.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (unified table)
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

# Landlock filesystem rights (uapi/linux/landlock.h).
LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_TRUNCATE = 1 << 14
LL_IOCTL_DEV = 1 << 15

_PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen", "pty.spawn"}
)
#: Ways to reach this hook's function object (to rewrite it) from the program.
_INTROSPECTION_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.symlink",
        "os.link",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "os.chflags",
        "os.lchflags",
        "os.mkfifo",
        "os.mknod",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.move",
    }
)


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def set_limits(policy: dict[str, Any]) -> None:
    """Kernel resource limits; soft == hard so the program cannot raise them again."""
    cpu = int(policy["cpu_seconds"])
    limits = {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_AS: (policy["memory_bytes"], policy["memory_bytes"]),
        resource.RLIMIT_FSIZE: (policy["file_bytes"], policy["file_bytes"]),
        resource.RLIMIT_NOFILE: (policy["open_files"], policy["open_files"]),
        resource.RLIMIT_NPROC: (policy["processes"], policy["processes"]),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def enter_namespaces(libc: Any, want: bool) -> tuple[bool, bool]:
    """New network/PID/IPC namespaces (plus a user namespace when not root, which is what
    makes the others permitted without privileges). Returns (network, pid) isolation."""
    if not want:
        return False, False
    user = 0 if os.geteuid() == 0 else CLONE_NEWUSER
    for flags, result in (
        (user | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC, (True, True)),
        (user | CLONE_NEWNET, (True, False)),
    ):
        if libc.unshare(flags) == 0:
            return result
    return False, False


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def become_reaped(libc: Any) -> None:
    """After unshare(CLONE_NEWPID) only *children* enter the namespace. Fork twice: the first
    child is the namespace's init (when it exits the kernel kills every process left in the
    namespace, however the program forked or daemonised), the second runs the program. Each
    parent just mirrors its child's exit status (signal N -> 128 + N)."""
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        os._exit(_exit_code(status))
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # our outer parent killed -> init dies -> all die
    program = os.fork()
    if program:
        while True:  # init also reaps orphans re-parented to it
            pid, status = os.wait()
            if pid == program:
                os._exit(_exit_code(status))


def drop_privileges(policy: dict[str, Any]) -> bool:
    """As root, become the configured unprivileged user (RLIMIT_NPROC does not bind root)."""
    uid, gid = policy.get("uid"), policy.get("gid")
    if os.geteuid() != 0 or uid is None or gid is None:
        return False
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return True


def landlock(libc: Any, policy: dict[str, Any]) -> int:
    """Restrict the file system and TCP with Landlock; returns the ABI used (0 = unavailable)."""
    import ctypes

    abi = int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1
    if abi >= 2:
        fs_all |= 1 << 13  # REFER
    if abi >= 3:
        fs_all |= LL_TRUNCATE
    if abi >= 5:
        fs_all |= LL_IOCTL_DEV
    file_rights = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV

    class Ruleset(ctypes.Structure):
        _fields_ = [
            ("handled_access_fs", ctypes.c_uint64),
            ("handled_access_net", ctypes.c_uint64),
            ("scoped", ctypes.c_uint64),
        ]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    # TCP bind/connect handled and never granted = no TCP (ABI 4); scoping (ABI 6) keeps
    # signals and abstract UNIX sockets inside the sandbox.
    attr = Ruleset(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)))
    if ruleset < 0:
        return 0
    try:
        rules = [(p, LL_EXECUTE | LL_READ_FILE | LL_READ_DIR) for p in policy["read_paths"]]
        rules += [(p, fs_all) for p in policy["write_paths"]]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # e.g. /lib64 does not exist on this system
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rights &= fs_all
                rule = PathBeneath(rights, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                    return 0
            finally:
                os.close(fd)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return 0
        return abi
    finally:
        os.close(ruleset)


def install_audit_hook(workdir: str, allow_processes: bool) -> None:
    """Python-level backstop: refuse network, foreign code, signals to other processes, file
    changes outside ``workdir`` and (without a PID namespace) new processes."""
    root = os.path.realpath(workdir)
    me = os.getpid()
    allowed_files = {"/dev/null"}

    def outside(path: Any) -> bool:
        if isinstance(path, int) or path is None:
            return False
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        real = os.path.realpath(os.path.join(root, os.fspath(path)))
        return real not in allowed_files and real != root and not real.startswith(root + os.sep)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event.startswith(("socket.", "ctypes.")) or event in _INTROSPECTION_EVENTS:
            raise PermissionError(f"{event} is not allowed in the sandbox")
        if event == "object.__setattr__" and len(args) >= 2 and args[1] in {"__code__", "__closure__", "__globals__"}:
            raise PermissionError("rewriting functions is not allowed in the sandbox")  # e.g. this hook
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and outside(path):
                raise PermissionError(f"writing {path!r} outside the working directory is not allowed")
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, str | bytes | os.PathLike) and outside(a):
                    raise PermissionError(f"{event} on {a!r} outside the working directory is not allowed")
        elif event in {"os.kill", "os.killpg", "signal.pthread_kill"} and args and args[0] not in {0, me}:
            raise PermissionError("signalling other processes is not allowed")
        elif not allow_processes and event in _PROCESS_EVENTS:
            raise PermissionError("starting processes is not allowed in the sandbox")

    sys.addaudithook(hook)


def main() -> None:
    policy: dict[str, Any] = marshal.loads(bytes.fromhex(sys.argv[1]))
    with open(policy["program"], "rb") as f:
        source = f.read()
    libc = _libc()
    set_limits(policy)
    network, pid = enter_namespaces(libc, policy["namespaces"])
    if pid:
        become_reaped(libc)
    dropped = drop_privileges(policy)
    abi = landlock(libc, policy) if policy["landlock"] else 0
    report = {
        "netns": network,
        "pidns": pid,
        "uid_dropped": dropped,
        "landlock_abi": abi,
        "uid": os.getuid(),
        "audit_hook": bool(policy.get("audit_hook", True)),
    }
    fd = policy.get("report_fd")
    if isinstance(fd, int):
        try:
            os.write(fd, marshal.dumps(report, 2))
            os.close(fd)
        except OSError:
            pass
    workdir = policy["workdir"]
    os.chdir(workdir)
    os.umask(0o077)
    if policy.get("audit_hook", True):
        install_audit_hook(workdir, allow_processes=pid)

    module = type(sys)("__main__")
    module.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = module
    sys.argv = ["solution.py"]
    del policy, libc
    exec(compile(source, "solution.py", "exec"), module.__dict__)


if __name__ == "__main__":
    main()

"""Small process helpers shared by the control plane, the kubelet and the S3 server.

Every daemon is started in its own session (so a signal reaches its whole process group)
and under ``setpriv --pdeathsig KILL`` (so it dies with the Python process that started it,
even when that process is SIGKILLed). Everything is stopped by PID, never by name, because
several people share this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

#: ``setpriv`` (util-linux) ties a child's life to its parent without a preexec_fn, which
#: is unsafe in a process that runs threads (the kubelet does).
_SETPRIV = shutil.which("setpriv")


#: What a daemon logs when the free port we picked was taken before it could bind it.
PORT_RACE = "address already in use"


def free_port() -> int:
    """A loopback TCP port that is free right now (the OS picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout``.

    ``alive`` is called between polls and returns an error text when a process we wait on
    has died, so a crash fails fast instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the thing is not up yet; remember why
            last_exc = e
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what}" + (f": {last_exc}" if last_exc else "")
            )
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Daemon:
    """A background process that we started, with its log file."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Daemon:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if _SETPRIV:
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def dead(self) -> str | None:
        """None while running; otherwise a message with the exit code and the log's tail."""
        if self.proc is None:
            return f"{self.name} was not started"
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"{self.name} exited with code {rc}; last lines of {self.log}:\n{tail(self.log)}"

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, grace=grace, popen=self.proc)


def stop_all(daemons: Sequence[Daemon], grace: float = 5.0) -> None:
    """SIGTERM all daemons at once, then wait for each (SIGKILL after ``grace``)."""
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(d.proc.pid, signal.SIGTERM)
    for d in daemons:
        d.stop(grace=grace)


def stop_pid(pid: int, grace: float = 5.0, popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the process group led by ``pid``, wait ``grace`` seconds, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_running(pid, popen):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
    else:
        deadline = time.monotonic() + 5
        while is_running(pid, None) and time.monotonic() < deadline:
            time.sleep(0.05)


def is_running(pid: int, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    if popen is not None:
        return popen.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of someone else still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (for the README figures)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run(
    argv: Sequence[str],
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
) -> str:
    """Run a short helper command; raise with its output when it fails."""
    res = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        stdin=stdin,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with code {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout

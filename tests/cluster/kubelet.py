"""A process kubelet: registers a Node and runs the pods bound to it as local processes.

Why: this machine has no container runtime, yet operator tests must see pods go through
the real lifecycle (Job controller -> scheduler -> "kubelet" -> Job completion, GC). This
kubelet does what a real one does towards the API server — Node + Lease heartbeats, pod
status transitions, termination messages, graceful deletion — but runs each container's
``command`` + ``args`` as a process on this machine. How paths are mapped: ``podspec.py``.

Status transitions, as on a real kubelet::

    Pending (waiting: ContainerCreating / CreateContainerConfigError)
      -> Running (state.running, startTime, Ready/ContainersReady True, podIP 127.0.0.1)
      -> Succeeded | Failed (state.terminated: exitCode, reason Completed/Error, message, finishedAt)

Deleting a pod sends SIGTERM to its processes, SIGKILL after the grace period (capped by
``max_grace_s``), then removes the pod with ``gracePeriodSeconds=0``.

Fault injection for resilience tests: :meth:`ProcessKubelet.fail_node`,
:meth:`ProcessKubelet.recover_node`, :meth:`ProcessKubelet.evict`, :meth:`ProcessKubelet.kill`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import podspec
from .dns import PodDNS
from .kubelet_api import KubeletAPI
from .podspec import NotReadyYet, PathMap

log = logging.getLogger("branchmerge.kubelet")

_SETPRIV = shutil.which("setpriv")
MAX_MESSAGE = 4096
NodeFailureMode = Literal["fail", "delete", "keep"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exit_code(rc: int) -> int:
    """Popen's negative signal return codes as a shell/container runtime reports them (128+N)."""
    return 128 - rc if rc < 0 else rc


@dataclass
class _Container:
    """Runtime state of one container of a pod."""

    spec: dict[str, Any]
    dir: Path
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restarts: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    reason_override: str | None = None
    next_start: float = 0.0
    paths: PathMap = field(default_factory=lambda: PathMap(()))
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> dict[str, Any]:
        image = str(self.spec.get("image") or "")
        running = "running" in self.state
        st: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": f"process://{image}",
            "ready": running and not self.init,
            "restartCount": self.restarts,
            "started": running,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            st["containerID"] = f"process://{self.proc.pid}"
        return st

    @property
    def terminated(self) -> dict[str, Any] | None:
        t = self.state.get("terminated")
        return t if isinstance(t, dict) else None


class _PodWorker(threading.Thread):
    """Owns one pod: prepares it, runs its containers, writes all of its status updates."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kl = kubelet
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = kubelet.pod_dir(self.ns, self.pod_name, self.uid)
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        self.init_containers = [
            _Container(c, self.dir / "containers" / c["name"], init=True)
            for c in spec.get("initContainers") or []
        ]
        self.containers = [
            _Container(c, self.dir / "containers" / c["name"]) for c in spec.get("containers") or []
        ]
        self.start_time = _now()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        #: why we stop: "delete" (graceful pod deletion), "evict", "node", "shutdown"
        self.stop_kind: str | None = None
        self.stop_grace = 0.0
        self.stop_message = ""
        self.phase = "Pending"
        self.cond_times: dict[str, tuple[str, str]] = {}
        self.done = threading.Event()
        self.finished = False  # set under ``lock`` once no stop request can be honoured any more
        self.deleted = False

    # ------------------------------------------------------------------ control from other threads

    def request_stop(self, kind: str, grace: float, message: str = "") -> bool:
        """Ask the worker to stop its pod; False if it already finished (the caller acts itself)."""
        with self.lock:
            if self.finished:
                return False
            if self.stop_kind is None or kind != "delete":
                self.stop_kind, self.stop_grace, self.stop_message = kind, grace, message
        self.stop_event.set()
        return True

    def signal(self, sig: int, reason: str | None) -> bool:
        """Send ``sig`` to every running container of the pod; ``reason`` overrides the terminated reason."""
        hit = False
        for c in self.init_containers + self.containers:
            if c.proc is not None and c.proc.poll() is None:
                c.reason_override = reason
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, sig)
                hit = True
        return hit

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s/%s crashed", self.ns, self.pod_name)
            self._kill_all(0)
        finally:
            with self.lock:
                self.finished = True
                late_delete = self.stop_kind == "delete" and not self.deleted
            if late_delete:  # deletion arrived while the pod was finishing on its own
                self.kl.delete_pod(self.ns, self.pod_name, self.uid)
            self.done.set()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._patch("Pending")
        # Volumes and env may reference objects that do not exist yet: wait, as a kubelet does
        # (and write the status only when the reason changes, so watchers are not woken each second).
        last: tuple[str, str] | None = None
        while True:
            try:
                self._prepare()
                break
            except NotReadyYet as e:
                if last != (e.reason, e.message):
                    last = (e.reason, e.message)
                    for c in self.init_containers + self.containers:
                        c.state = {"waiting": {"reason": e.reason, "message": e.message}}
                    self._patch("Pending")
                if self.stop_event.wait(1.0):
                    self._finish()
                    return
        for c in self.init_containers:
            if not self._run_init(c):
                self._finish()
                return
        for c in self.containers:
            self._start(c)
        self._patch(self._live_phase())
        self._supervise()
        self._finish()

    def _run_init(self, c: _Container) -> bool:
        """Run one init container to success, retrying per restartPolicy; False if the pod must stop."""
        while not self.stop_event.is_set():
            if self._start(c):
                self._patch("Pending")
                self._wait_until_exit([c])
            t = c.terminated
            if t is not None and t["exitCode"] == 0:
                return True
            if self.restart_policy == "Never" or self.stop_event.is_set():
                return False
            c.last_state, c.restarts = {"terminated": t}, c.restarts + 1
            self._patch("Pending")
            self.stop_event.wait(self._backoff(c))
        return False

    def _prepare(self) -> None:
        all_mounts: dict[str, str | Path] = {}
        # A first pass over mount paths (without volumes) so that volume text can be rewritten.
        vol_dirs = {
            v["name"]: self.dir / "volumes" / v["name"] for v in self.pod["spec"].get("volumes") or []
        }
        for c in self.init_containers + self.containers:
            all_mounts.update(podspec.container_paths(c.spec, vol_dirs, c.dir).as_dict())
        volumes = podspec.materialize_volumes(
            self.pod,
            self.dir,
            self.kl.lookup,
            self.kl.raw_lookup,
            self.kl.pvc_dir,
            PathMap.of(all_mounts),
        )
        for c in self.init_containers + self.containers:
            c.dir.mkdir(parents=True, exist_ok=True)
            c.paths = podspec.container_paths(c.spec, volumes, c.dir)
            # Only what the pod spec provides is seen through the mount map; this machine's own
            # values (PATH to the venv, PYTHONPATH, …) are host paths and stay as they are.
            c.env = podspec.container_env(
                self.pod, c.spec, self._base_env(c), self.kl.lookup, self.kl.allocatable, c.paths
            )
            c.argv = self._argv(c)

    def _base_env(self, c: _Container) -> dict[str, str]:
        env = {k: os.environ[k] for k in self.kl.inherit_env if k in os.environ}
        env.update(
            {
                "PATH": os.pathsep.join(
                    [str(Path(sys.executable).parent), *self.kl.extra_path, "/usr/local/bin:/usr/bin:/bin"]
                ),
                "HOME": str(c.dir / "home"),
                "HOSTNAME": self.pod_name,
                "KUBERNETES_SERVICE_HOST": self.kl.api_host,
                "KUBERNETES_SERVICE_PORT": self.kl.api_port,
                podspec.POD_DIR_ENV: str(self.dir),
            }
        )
        env.update(self.kl.extra_env)
        return env

    def _argv(self, c: _Container) -> list[str]:
        image = str(c.spec.get("image") or "")
        command = list(c.spec.get("command") or [])
        args = list(c.spec.get("args") or [])
        if not command:
            entry = self.kl.entrypoint(image)
            if entry is None:
                raise NotReadyYet(
                    "CreateContainerError",
                    f"image {image!r} has no entrypoint known to the process kubelet: give the container a "
                    "command, or add the image to ProcessKubelet(image_commands=...)",
                )
            command = entry
        # Rewrite the literal text first, then expand: expanded values are already final.
        return [podspec.expand(c.paths.rewrite(a), c.env) for a in command + args]

    def _start(self, c: _Container) -> bool:
        paths = c.paths
        env = dict(c.env)
        env[podspec.PATH_MAP_ENV] = podspec.env_json(paths)
        workdir = c.spec.get("workingDir")
        cwd = (
            Path(paths.path(workdir) or (c.dir / "root" / workdir.lstrip("/"))) if workdir else c.dir / "root"
        )
        cwd.mkdir(parents=True, exist_ok=True)
        (c.dir / "home").mkdir(parents=True, exist_ok=True)
        term = Path(
            paths.path(c.spec.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_PATH) or ""
        )
        with contextlib.suppress(OSError):
            term.unlink()
        argv = c.argv
        exe = shutil.which(argv[0], path=env.get("PATH", "")) if "/" not in argv[0] else argv[0]
        if exe is None:
            return self._start_error(c, f'exec: "{argv[0]}": executable file not found in $PATH')
        full = [_SETPRIV, "--pdeathsig", "KILL", "--", exe, *argv[1:]] if _SETPRIV else [exe, *argv[1:]]
        if self.pod["spec"].get("subdomain"):
            full = self.kl.dns.wrap(full, self.ns)  # its /etc/hosts has <pod>.<service> names (dns.py)
        logf = self.kl.log_path(self.ns, self.pod_name, c.name, self.uid)
        try:
            with open(logf, "ab") as out:
                c.proc = subprocess.Popen(
                    full,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as e:
            return self._start_error(c, f"exec {argv[0]}: {e}")
        c.started_at = _now()
        c.reason_override = None
        c.state = {"running": {"startedAt": c.started_at}}
        log.info("started %s/%s[%s] pid %d: %s", self.ns, self.pod_name, c.name, c.proc.pid, argv)
        return True

    def _start_error(self, c: _Container, message: str) -> bool:
        now = _now()
        if not c.init and self._restarts(128):
            c.next_start = time.monotonic() + self._backoff(c)
        c.state = {
            "terminated": {
                "exitCode": 128,
                "reason": "StartError",
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }
        }
        return False

    def _wait_until_exit(self, cs: Sequence[_Container]) -> None:
        while True:
            if self.stop_event.is_set():
                self._kill_all(self.stop_grace)
            if all(self._reap(c) for c in cs):
                return
            time.sleep(0.05)

    def _reap(self, c: _Container) -> bool:
        """True once ``c`` is not running; records its terminated state when it just exited."""
        if c.proc is None or "running" not in c.state:
            return True
        rc = c.proc.poll()
        if rc is None:
            return False
        code = _exit_code(rc)
        reason = c.reason_override or ("Completed" if code == 0 else "Error")
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": c.started_at,
            "finishedAt": _now(),
            "containerID": f"process://{c.proc.pid}",
        }
        if code >= 128:
            term["signal"] = code - 128
        message = self._termination_message(c, code)
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        log.info("%s/%s[%s] exited with %d", self.ns, self.pod_name, c.name, code)
        return True

    def _termination_message(self, c: _Container, code: int) -> str:
        term = c.paths.path(c.spec.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_PATH)
        text = ""
        if term:
            with contextlib.suppress(OSError):
                text = Path(term).read_bytes()[:MAX_MESSAGE].decode(errors="replace")
        if not text and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            logs = self.kl.log_path(self.ns, self.pod_name, c.name, self.uid).read_bytes()
            text = "\n".join(logs.decode(errors="replace").splitlines()[-80:])[-2048:]
        return text

    def _supervise(self) -> None:
        """Wait for the containers, restarting them per restartPolicy, until none will run again."""
        while True:
            if self.stop_event.is_set():
                self._kill_all(self.stop_grace)
                for c in self.containers:
                    self._reap(c)
                return
            changed = False
            for c in self.containers:
                if "running" in c.state:
                    if self._reap(c):
                        changed = True
                        term = c.state["terminated"]
                        if self._restarts(term["exitCode"]):
                            c.next_start = time.monotonic() + self._backoff(c)
                            c.last_state = {"terminated": term}
                            c.state = {
                                "waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}
                            }
                elif c.next_start and time.monotonic() >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    self._start(c)
                    changed = True
            pending_restart = any(c.next_start for c in self.containers)
            running = any("running" in c.state for c in self.containers)
            if not running and not pending_restart:
                return
            if changed:
                self._patch(self._live_phase())
            time.sleep(0.05)

    def _live_phase(self) -> str:
        """Running once a container has started (also while it waits to restart), else Pending."""
        return "Running" if any(c.started_at for c in self.containers) else "Pending"

    def _restarts(self, exit_code: int) -> bool:
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)

    @staticmethod
    def _backoff(c: _Container) -> float:
        """Restart back-off: 0.5 s doubling to 10 s (a kubelet uses 10 s to 5 min; tests want speed)."""
        return min(10.0, 0.5 * 2 ** min(c.restarts, 5))

    def _kill_all(self, grace: float) -> None:
        procs = [
            c.proc
            for c in self.init_containers + self.containers
            if c.proc is not None and c.proc.poll() is None
        ]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace)
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)

    def _finish(self) -> None:
        """Write the final status (or the eviction / node-loss status) and, if deleted, remove the pod."""
        with self.lock:
            kind = self.stop_kind
        if kind == "shutdown":
            return
        if kind == "node" and self.kl.node_failure_mode == "keep":
            # A partitioned node: the API still says Running until the node comes back.
            while not self.kl.recovered.wait(0.2):
                if self.kl.stopping.is_set():
                    return
        if kind == "node" and self.kl.node_failure_mode == "delete":
            self.deleted = True
            self.kl.delete_pod(self.ns, self.pod_name, self.uid)
            return
        codes = [(c.terminated or {}).get("exitCode", 1) for c in self.init_containers + self.containers]
        failed = any(code != 0 for code in codes) or any(c.terminated is None for c in self.containers)
        phase = "Failed" if failed else "Succeeded"
        extra: dict[str, Any] = {}
        if kind == "evict":
            extra = {
                "reason": "Evicted",
                "message": self.stop_message or "The node was low on resource: memory.",
            }
            phase = "Failed"
        elif kind == "node":
            extra = {"reason": "NodeLost", "message": self.stop_message or f"node {self.kl.node_name} failed"}
            phase = "Failed"
        if kind == "delete":
            self._patch(phase, terminal=True)
            self.deleted = True
            self.kl.delete_pod(self.ns, self.pod_name, self.uid)
            return
        self._patch(phase, terminal=True, disruption=kind in ("evict", "node"), **extra)

    # ------------------------------------------------------------------ status

    def _patch(self, phase: str, terminal: bool = False, disruption: bool = False, **extra: str) -> None:
        now = _now()
        self.phase = phase
        running = phase == "Running" and all("running" in c.state for c in self.containers)
        initialized = all((c.terminated or {}).get("exitCode") == 0 for c in self.init_containers)
        ready_reason = "PodCompleted" if terminal else ("ContainersNotReady" if not running else "")

        def cond(t: str, ok: bool, reason: str = "") -> dict[str, Any]:
            status = "True" if ok else "False"
            # lastTransitionTime moves only when the status does, as on a real kubelet.
            prev = self.cond_times.get(t)
            since = prev[1] if prev and prev[0] == status else now
            self.cond_times[t] = (status, since)
            d: dict[str, Any] = {
                "type": t,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": since,
            }
            if reason and not ok:
                d["reason"] = reason
            return d

        conditions = [
            cond("Initialized", initialized or terminal, "ContainersNotInitialized"),
            cond("ContainersReady", running, ready_reason),
            cond("Ready", running, ready_reason),
        ]
        if disruption:
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "lastTransitionTime": now,
                    "reason": "TerminationByKubelet"
                    if extra.get("reason") == "Evicted"
                    else "DeletionByTaintManager",
                    "message": extra.get("message", ""),
                }
            )
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
            **extra,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        self.kl.patch_pod_status(self.ns, self.pod_name, status)


class ProcessKubelet:
    """One Node whose pods run as processes on this machine.

    ``image_commands`` maps an image (``repo/name:tag``, or ``repo/name`` for every tag) to
    its entrypoint, used when a container has no ``command`` — so tests can use real image
    names. ``extra_env`` is added to every container; ``inherit_env`` names variables copied
    from this process. The venv's ``bin`` comes first on ``PATH`` so that console scripts
    such as ``branchmerge-train`` resolve.
    """

    def __init__(
        self,
        api_client_factory: Any,
        workdir: Path,
        node_name: str = "node-1",
        cpu: str = "16",
        memory: str = "64Gi",
        gpus: int = 8,
        pods: int = 110,
        labels: Mapping[str, str] | None = None,
        image_commands: Mapping[str, Sequence[str]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        inherit_env: Sequence[str] = (
            "LANG",
            "LC_ALL",
            "TZ",
            "TMPDIR",
            "PYTHONPATH",
            "PYTHONDONTWRITEBYTECODE",
        ),
        extra_path: Sequence[str] = (),
        heartbeat_s: float = 10.0,
        max_grace_s: float = 10.0,
    ) -> None:
        from kubernetes import client

        self._client_factory = api_client_factory
        self._api = api_client_factory()
        self.core = client.CoreV1Api(self._api)
        self.coord = client.CoordinationV1Api(self._api)
        host = self._api.configuration.host.split("://", 1)[-1]
        self.api_host, _, self.api_port = host.rpartition(":")
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.capacity = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "100Gi"}
        if gpus:
            self.capacity["nvidia.com/gpu"] = str(gpus)
        self.allocatable = dict(self.capacity)
        self.labels = dict(labels or {})
        self.image_commands = {k: list(v) for k, v in (image_commands or {}).items()}
        self.extra_env = dict(extra_env or {})
        self.inherit_env = tuple(inherit_env)
        self.extra_path = tuple(extra_path)
        self.heartbeat_s = heartbeat_s
        self.max_grace_s = max_grace_s
        self.workers: dict[str, _PodWorker] = {}
        self._node_cond_since: dict[str, tuple[str, str]] = {}
        self._workers_lock = threading.Lock()
        self.stopping = threading.Event()
        self._node_failed = threading.Event()
        self.recovered = threading.Event()
        self.node_failure_mode: NodeFailureMode = "fail"
        self._threads: list[threading.Thread] = []
        self._kubelet_api: KubeletAPI | None = None
        #: DNS names of pods behind headless Services (dns.py), for pods with hostname+subdomain
        self.dns = PodDNS(self.core, self.workdir / "dns")
        self.dns_refresh_s = 1.0

    # ------------------------------------------------------------------ public API

    def start(self, timeout: float = 30) -> ProcessKubelet:
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        # Container logs over HTTPS, as the API server's pods/log proxy expects (kubelet_api.py).
        self._kubelet_api = KubeletAPI(self._container_log, self.workdir / "pki").start()
        self._register()
        loops = ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watch"), (self._dns_loop, "dns"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"kubelet-{self.node_name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Kill every pod process (no status writes: the control plane is going away)."""
        self.stopping.set()
        with self._workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            w.request_stop("shutdown", 0.5)
        for w in workers:
            w.done.wait(10)
        for t in self._threads:
            t.join(timeout=1)
        if self._kubelet_api is not None:
            self._kubelet_api.stop()
        self._api.close()

    def entrypoint(self, image: str) -> list[str] | None:
        if image in self.image_commands:
            return list(self.image_commands[image])
        base = image.split("@", 1)[0]
        repo, _, tag = base.rpartition(":")
        if repo and "/" not in tag:
            base = repo
        return list(self.image_commands[base]) if base in self.image_commands else None

    def pod_dir(self, namespace: str, name: str, uid: str | None = None) -> Path:
        """The local directory of a pod (volumes/, containers/<name>/termination-log, logs/)."""
        if uid is None:
            uid = self._uid(namespace, name)
        return self.workdir / "pods" / f"{namespace}_{name}_{uid[:8]}"

    def log_path(self, namespace: str, name: str, container: str, uid: str | None = None) -> Path:
        d = self.pod_dir(namespace, name, uid) / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{container}.log"

    def _container_log(self, namespace: str, name: str, container: str) -> tuple[Path, bool] | None:
        """For the log API: the newest pod of that name on this node, and whether it still runs."""
        with self._workers_lock:
            mine = [w for w in self.workers.values() if w.ns == namespace and w.pod_name == name]
        if not mine:
            return None
        live = [w for w in mine if not w.done.is_set()]
        w = (live or mine)[-1]
        return self.log_path(namespace, name, container, w.uid), bool(live)

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        """A container's stdout+stderr, read from the file (``kubectl logs`` reads the same
        through the API server and ``kubelet_api.py``)."""
        uid = self._uid(namespace, name)
        if container is None:
            pod = self.core.read_namespaced_pod(name, namespace)
            container = pod.spec.containers[0].name
        p = self.log_path(namespace, name, container, uid)
        return p.read_text(errors="replace") if p.exists() else ""

    def evict(
        self, namespace: str, name: str, message: str = "The node was low on resource: memory."
    ) -> None:
        """Kill the pod's processes and mark it Failed/Evicted with a DisruptionTarget condition."""
        self._worker(namespace, name).request_stop("evict", 0.0, message)

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL, reason: str | None = None) -> None:
        """Send ``sig`` to a pod's running containers (e.g. ``reason="OOMKilled"``); restartPolicy applies."""
        if not self._worker(namespace, name).signal(sig, reason):
            raise RuntimeError(f"pod {namespace}/{name} has no running container")

    def fail_node(self, pods: NodeFailureMode = "fail", message: str = "") -> None:
        """Simulate a dead node: heartbeats stop, the Node turns NotReady/Unknown with unreachable
        taints, and every pod process is SIGKILLed. Then, per ``pods``: ``"fail"`` marks the pods
        Failed (reason NodeLost, DisruptionTarget condition); ``"delete"`` force-deletes them (as
        pod GC does once a lost node is removed); ``"keep"`` leaves them Running in the API until
        :meth:`recover_node` (a partition), after which they are marked Failed.
        """
        self.node_failure_mode = pods
        self.recovered.clear()
        self._node_failed.set()
        now = _now()
        self._patch_node_status(ready=False, now=now)
        taints = [
            {"key": "node.kubernetes.io/unreachable", "effect": e, "timeAdded": now}
            for e in ("NoSchedule", "NoExecute")
        ]
        self._set_taints(taints)
        with self._workers_lock:
            workers = [w for w in self.workers.values() if not w.done.is_set()]
        for w in workers:
            w.request_stop("node", 0.0, message)
        if pods != "keep":
            for w in workers:
                w.done.wait(15)

    def recover_node(self) -> None:
        """Undo :meth:`fail_node`: Ready again, taints removed, heartbeats resume, new pods run."""
        self._node_failed.clear()
        self.recovered.set()
        self._patch_node_status(ready=True, now=_now())
        self._set_taints([])

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until no pod worker is running (handy before asserting on leftover processes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._workers_lock:
                if all(w.done.is_set() for w in self.workers.values()):
                    return
            time.sleep(0.1)
        raise TimeoutError("pods still running on the process kubelet")

    # ------------------------------------------------------------------ Secret / ConfigMap lookups

    def lookup(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "Secret":
                obj = self.core.read_namespaced_secret(name, ns)
                return {k: v.decode(errors="replace") for k, v in podspec.decode_secret(obj.data).items()}
            obj = self.core.read_namespaced_config_map(name, ns)
            return dict(obj.data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def pvc_dir(self, ns: str, claim: str) -> Path:
        """Where a PVC's data lives: its bound PV's ``hostPath``/``local`` path, else a directory per claim."""
        from kubernetes.client.exceptions import ApiException

        d = self.workdir / "pvc" / ns / claim
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, ns)
            if pvc.spec.volume_name:
                pv = self.core.read_persistent_volume(pvc.spec.volume_name).spec
                src = pv.host_path or pv.local
                if src is not None:
                    d = Path(src.path)
        except ApiException as e:
            if e.status != 404:
                raise
        d.mkdir(parents=True, exist_ok=True)
        return d

    def raw_lookup(self, kind: str, ns: str, name: str) -> dict[str, bytes] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "Secret":
                return podspec.decode_secret(self.core.read_namespaced_secret(name, ns).data)
            obj = self.core.read_namespaced_config_map(name, ns)
            return podspec.decode_secret(obj.binary_data)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # ------------------------------------------------------------------ node

    def _node_status(self, ready: bool, now: str) -> dict[str, Any]:
        lost = ("Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.")
        wanted = [
            (
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
        ]
        conditions = []
        for t, status, reason, message in wanted:
            if not ready:
                status, reason, message = lost
            prev = self._node_cond_since.get(t)
            since = prev[1] if prev and prev[0] == status else now
            self._node_cond_since[t] = (status, since)
            conditions.append({"type": t, "status": status, "reason": reason, "message": message,
                               "lastHeartbeatTime": now, "lastTransitionTime": since})  # fmt: skip
        return {
            "capacity": self.capacity,
            "allocatable": self.allocatable,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {
                "kubeletEndpoint": {"Port": self._kubelet_api.port if self._kubelet_api else 0}
            },
            "nodeInfo": {
                "machineID": "process-kubelet",
                "systemUUID": self.node_name,
                "bootID": self.node_name,
                "kernelVersion": os.uname().release,
                "osImage": "process kubelet (branchmerge tests)",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "node.kubernetes.io/instance-type": "process-kubelet", **self.labels}  # fmt: skip
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            node = self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
            node = self.core.read_node(self.node_name)
        self._node_uid = node.metadata.uid
        self._patch_node_status(ready=True, now=_now())
        # The TaintNodesByCondition admission adds node.kubernetes.io/not-ready at creation; the
        # node-lifecycle controller (off here) would remove it once Ready. Do it ourselves.
        self._set_taints([])
        self._renew_lease()

    def _patch_node_status(self, ready: bool, now: str) -> None:
        self.core.patch_node_status(
            self.node_name,
            {"status": self._node_status(ready, now)},
            _content_type="application/strategic-merge-patch+json",
        )

    def _set_taints(self, taints: list[dict[str, Any]]) -> None:
        self.core.patch_node(
            self.node_name, {"spec": {"taints": taints or None}}, _content_type="application/merge-patch+json"
        )

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}
        try:
            self.coord.patch_namespaced_lease(
                self.node_name,
                "kube-node-lease",
                {"spec": spec},
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self._node_uid}
            self.coord.create_namespaced_lease(
                "kube-node-lease",
                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node_name, "ownerReferences": [owner]}, "spec": spec},
            )  # fmt: skip

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.heartbeat_s):
            if self._node_failed.is_set():
                continue
            try:
                self._renew_lease()
                self._patch_node_status(ready=True, now=_now())
            except Exception as e:  # the apiserver may be restarting; try again next beat
                log.warning("heartbeat of %s failed: %s", self.node_name, e)

    def _dns_loop(self) -> None:
        """Keep the hosts files of namespaces with running DNS-named pods current (a gang's
        ranks start in any order; each must find rank 0 once it exists)."""
        while not self.stopping.wait(self.dns_refresh_s):
            with self._workers_lock:
                namespaces = {
                    w.ns
                    for w in self.workers.values()
                    if not w.done.is_set() and w.pod["spec"].get("subdomain")
                }
            for ns in sorted(namespaces):
                try:
                    self.dns.refresh(ns)
                except Exception as e:  # the apiserver may be restarting; try again
                    log.warning("DNS refresh of %s failed: %s", ns, e)

    # ------------------------------------------------------------------ pods

    def _watch_loop(self) -> None:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        api = self._client_factory()
        core = client.CoreV1Api(api)
        selector = f"spec.nodeName={self.node_name}"
        try:
            while not self.stopping.is_set():
                try:
                    resp = core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                    listing = json.loads(resp.data)
                    for pod in listing.get("items") or []:
                        self._on_pod("ADDED", pod)
                    rv = listing["metadata"]["resourceVersion"]
                    w = watch.Watch()
                    for ev in w.stream(
                        core.list_pod_for_all_namespaces,
                        field_selector=selector,
                        resource_version=rv,
                        timeout_seconds=20,
                        _request_timeout=30,
                    ):
                        if self.stopping.is_set():
                            w.stop()
                            break
                        if ev["type"] == "ERROR":
                            break
                        self._on_pod(ev["type"], ev["raw_object"])
                except ApiException as e:
                    if e.status != 410:
                        log.warning("pod watch failed: %s", e)
                        self.stopping.wait(0.5)
                except Exception as e:  # connection reset while the control plane stops, etc.
                    if not self.stopping.is_set():
                        log.warning("pod watch failed: %s", e)
                        self.stopping.wait(0.5)
        finally:
            api.close()

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._workers_lock:
            worker = self.workers.get(uid)
        if event == "DELETED":
            if worker is not None and not worker.done.is_set():
                worker.request_stop("shutdown", 0.0)
            return
        if meta.get("deletionTimestamp"):
            grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.max_grace_s)
            if worker is None or not worker.request_stop("delete", grace):
                threading.Thread(
                    target=self.delete_pod, args=(meta["namespace"], meta["name"], uid), daemon=True
                ).start()
            return
        if worker is not None or self._node_failed.is_set() or self.stopping.is_set():
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        worker = _PodWorker(self, pod)
        with self._workers_lock:
            self.workers[uid] = worker
        worker.start()

    def _uid(self, namespace: str, name: str) -> str:
        with self._workers_lock:
            for uid, w in self.workers.items():
                if w.ns == namespace and w.pod_name == name:
                    return uid
        return str(self.core.read_namespaced_pod(name, namespace).metadata.uid)

    def _worker(self, namespace: str, name: str) -> _PodWorker:
        with self._workers_lock:
            found = [
                w
                for w in self.workers.values()
                if w.ns == namespace and w.pod_name == name and not w.done.is_set()
            ]
        if not found:
            raise RuntimeError(f"pod {namespace}/{name} is not running on node {self.node_name}")
        return found[-1]

    def patch_pod_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        for attempt in range(5):
            try:
                self.core.patch_namespaced_pod_status(
                    name, ns, {"status": status}, _content_type="application/strategic-merge-patch+json"
                )
                return
            except ApiException as e:
                if e.status == 404:
                    return  # the pod is gone; nothing to report to
                if e.status not in (409, 429, 500, 503) or attempt == 4:
                    log.warning("status patch of %s/%s failed: %s", ns, name, e)
                    return
            except Exception as e:
                if self.stopping.is_set():
                    return
                log.warning("status patch of %s/%s failed: %s", ns, name, e)
            time.sleep(0.2 * (attempt + 1))

    def delete_pod(self, ns: str, name: str, uid: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(
                name,
                ns,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                grace_period_seconds=0,
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("delete of %s/%s failed: %s", ns, name, e)
        except Exception as e:
            if not self.stopping.is_set():
                log.warning("delete of %s/%s failed: %s", ns, name, e)

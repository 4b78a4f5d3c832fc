"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

Why real binaries: operator tests must meet real schema validation, the status subresource,
resourceVersion conflicts, watches, RBAC, the Job controller, the scheduler and garbage
collection. The binaries come from ``tests/cluster/build.sh`` (Debian's source package);
only the kubelet is replaced (see ``kubelet.py``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .procs import PORT_RACE, Daemon, free_port, rss_mib, run, stop_all, wait_for

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from .kubelet import ProcessKubelet

K8S_VERSION = "v1.20.2"
#: build.sh's K8S_BUILD: the cache directory is named after it, so binaries built with an older
#: set of source patches are not used (rev2: empty strings in custom resources validate).
K8S_BUILD = f"{K8S_VERSION}-rev2"
CACHE = Path(os.environ.get("BRANCHMERGE_CACHE", Path.home() / ".cache" / "branchmerge"))
#: Override where the control-plane binaries are (default: build.sh's cache).
BIN_ENV = "BRANCHMERGE_K8S_BIN"
TOOLS_ENV = "BRANCHMERGE_K8S_TOOLS"
BUILD_HINT = (
    "run `tests/cluster/build.sh` (builds Kubernetes from Debian's source package, ~6 min once, then cached)"
)


class HarnessNotBuilt(RuntimeError):
    """The binaries the harness needs are missing: the message says how to build them."""


def bin_dir() -> Path:
    return Path(os.environ.get(BIN_ENV, CACHE / f"k8s-{K8S_BUILD}"))


def tools_dir() -> Path:
    return Path(os.environ.get(TOOLS_ENV, CACHE / "tools-kubectl-v35"))


def require_binaries() -> dict[str, Path]:
    """Paths of etcd and the three control-plane binaries, or a clear error saying how to build them."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        p = bin_dir() / name
        if os.access(p, os.X_OK):
            found[name] = p
        else:
            missing.append(str(p))
    etcd = shutil.which("etcd")
    if etcd:
        found["etcd"] = Path(etcd)
    else:
        missing.append("etcd (Debian package etcd-server)")
    if not shutil.which("openssl"):
        missing.append("openssl")
    if missing:
        raise HarnessNotBuilt(
            "test control plane not available, missing: " + ", ".join(missing) + f"; {BUILD_HINT}"
        )
    return found


def kubectl_path() -> Path:
    p = tools_dir() / "kubectl"
    if not os.access(p, os.X_OK):
        raise HarnessNotBuilt(f"kubectl not found at {p}; {BUILD_HINT}")
    return p


def helm_path() -> Path:
    p = tools_dir() / "helm"
    if not os.access(p, os.X_OK):
        raise HarnessNotBuilt(f"helm not found at {p}; {BUILD_HINT}")
    return p


@dataclass
class Cluster:
    """How a test reaches the control plane: endpoint, credentials and helpers."""

    server: str
    token: str
    ca: Path
    kubeconfig: Path
    workdir: Path
    #: PIDs of etcd, kube-apiserver, kube-controller-manager, kube-scheduler (for RSS figures).
    pids: dict[str, int] = field(default_factory=dict)
    kubelet: ProcessKubelet | None = None  # the default node, once started

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` for this cluster (admin token, verified TLS)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        # kubernetes>=36 reads "BearerToken"; older clients read "authorization".
        cfg.api_key = {"BearerToken": self.token, "authorization": self.token}
        cfg.api_key_prefix = {"BearerToken": "Bearer", "authorization": "Bearer"}
        cfg.ssl_ca_cert = str(self.ca)
        cfg.verify_ssl = True
        return cfg

    def api_client(self) -> ApiClient:
        """A fresh ``kubernetes.client.ApiClient``; close it (or use it as a context manager)."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def service_account_token(self, namespace: str, name: str = "default", timeout: float = 30) -> str:
        """The token of a ServiceAccount (its auto-created token Secret), to act as it in RBAC tests."""
        deadline = time.monotonic() + timeout
        while True:
            sa = self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            for ref in sa.get("secrets") or []:
                secret = self.get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                token = (secret.get("data") or {}).get("token")
                if token:
                    return base64.b64decode(token).decode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no token Secret for ServiceAccount {namespace}/{name}")
            time.sleep(0.1)

    def kubeconfig_for(self, namespace: str, service_account: str = "default") -> Path:
        """A kubeconfig that authenticates as a ServiceAccount (e.g. to run the operator with its own RBAC)."""
        path = self.workdir / f"kubeconfig-{namespace}-{service_account}"
        token = self.service_account_token(namespace, service_account)
        _write_kubeconfig(
            path, self.server, self.ca, token, user=f"{namespace}-{service_account}", namespace=namespace
        )
        return path

    def api_client_as(self, namespace: str, service_account: str = "default") -> ApiClient:
        """An ApiClient authenticated as a ServiceAccount."""
        from kubernetes import client

        cfg = self.configuration()
        token = self.service_account_token(namespace, service_account)
        cfg.api_key = {"BearerToken": token, "authorization": token}
        return client.ApiClient(cfg)

    def env(self) -> dict[str, str]:
        """Environment for tools and subprocesses (kubectl, helm, kopf, the operator CLI)."""
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": f"{tools_dir()}:{os.environ.get('PATH', '')}"}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        """Run the cached kubectl against this cluster; return stdout (raise with stderr on failure)."""
        res = subprocess.run(
            [str(kubectl_path()), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}"
            )
        return res.stdout

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Run the cached helm against this cluster."""
        res = subprocess.run(
            [str(helm_path()), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}")
        return res.stdout

    def get(self, path: str) -> Any:
        """GET an API path (e.g. ``/readyz`` or ``/api/v1/nodes``) and decode JSON when it is JSON."""
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            body = resp.read().decode()
        try:
            return json.loads(body)
        except ValueError:
            return body

    def dump(self, namespace: str) -> str:
        """Everything useful to debug a failed test in ``namespace``: objects, events, pod logs."""
        parts = []
        for args in (("get", "all,events", "-o", "wide"), ("get", "pods", "-o", "yaml")):
            try:
                parts.append(self.kubectl("-n", namespace, *args))
            except Exception as e:  # a dump must never hide the original failure
                parts.append(f"kubectl {' '.join(args)}: {e}")
        if self.kubelet is not None:
            for d in sorted((self.kubelet.workdir / "pods").glob(f"{namespace}_*")):
                for log in sorted((d / "logs").glob("*.log")):
                    parts.append(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def rss_mib(self) -> dict[str, float]:
        return {name: round(rss_mib(pid), 1) for name, pid in self.pids.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "token": self.token,
            "ca": str(self.ca),
            "kubeconfig": str(self.kubeconfig),
            "workdir": str(self.workdir),
            "pids": self.pids,
        }


def _write_kubeconfig(
    path: Path, server: str, ca: Path, token: str, user: str = "admin", namespace: str | None = None
) -> None:
    ca_data = base64.b64encode(ca.read_bytes()).decode()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "branchmerge-test", "cluster": {"server": server, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "branchmerge-test",
                "context": {
                    "cluster": "branchmerge-test",
                    "user": user,
                    **({"namespace": namespace} if namespace else {}),
                },
            }
        ],
        "current-context": "branchmerge-test",
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML; kubectl reads it
    path.chmod(0o600)


def _make_pki(d: Path) -> None:
    """A CA, an apiserver serving cert for loopback, and the service-account key pair (openssl)."""
    d.mkdir(parents=True, exist_ok=True)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=branchmerge-test-ca",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt")])  # fmt: skip
    (d / "san.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:192.0.2.2,DNS:localhost,"
        "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
         "-keyout", str(d / "apiserver.key"), "-out", str(d / "apiserver.csr")])  # fmt: skip
    run(["openssl", "x509", "-req", "-in", str(d / "apiserver.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
         "-CAcreateserial", "-days", "30", "-extfile", str(d / "san.cnf"), "-extensions", "ext",
         "-out", str(d / "apiserver.crt")])  # fmt: skip
    run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"])
    run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")])


class ControlPlane:
    """Starts and stops etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``stop`` is safe to call
    twice and after a failed start.
    """

    def __init__(self, workdir: Path | None = None, keep_workdir: bool = False) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="branchmerge-k8s-"))
        self.keep_workdir = keep_workdir
        self.daemons: list[Daemon] = []
        self.cluster: Cluster | None = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60, attempts: int = 3) -> Cluster:
        """Start everything; retry on a port taken between picking and binding it (others share this machine)."""
        bins = require_binaries()
        for attempt in range(attempts):
            try:
                return self._start(bins, timeout)
            except BaseException as e:
                self.stop(keep_workdir=True)
                if PORT_RACE in str(e) and attempt + 1 < attempts:
                    _clear(self.workdir)
                    continue
                e.add_note(f"control-plane logs kept in {self.workdir / 'logs'}")
                raise
        raise AssertionError("unreachable")

    def _start(self, bins: dict[str, Path], timeout: float) -> Cluster:
        w = self.workdir
        pki = w / "pki"
        _make_pki(pki)
        token = secrets.token_hex(16)
        (w / "tokens.csv").write_text(f'{token},admin,admin-uid,"system:masters"\n')
        logs = w / "logs"

        etcd_port, peer_port = free_port(), free_port()
        etcd = Daemon(
            "etcd",
            [str(bins["etcd"]), "--name=default", f"--data-dir={w / 'etcd'}", "--unsafe-no-fsync",
             f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
             f"--listen-peer-urls=http://127.0.0.1:{peer_port}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
             f"--initial-cluster=default=http://127.0.0.1:{peer_port}", "--log-level=warn"],
            logs / "etcd.log",
        ).start()  # fmt: skip
        self.daemons.append(etcd)

        def etcd_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")

        wait_for("etcd /health", etcd_ready, timeout, alive=etcd.dead)

        port = free_port()
        server = f"https://127.0.0.1:{port}"
        apiserver = Daemon(
            "kube-apiserver",
            [str(bins["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
             "--bind-address=127.0.0.1", f"--secure-port={port}", "--insecure-port=0",
             "--advertise-address=192.0.2.2", "--service-cluster-ip-range=10.96.0.0/24",
             f"--cert-dir={w / 'apiserver-certs'}",
             f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
             f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={w / 'tokens.csv'}",
             "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
             "--api-audiences=https://kubernetes.default.svc.cluster.local", "--profiling=false",
             # pods/log and exec reach a node at its InternalIP (the Hostname is not resolvable here)
             "--kubelet-preferred-address-types=InternalIP",
             "--logtostderr=true", "--v=0"],
            logs / "kube-apiserver.log",
        ).start()  # fmt: skip
        self.daemons.append(apiserver)
        kubeconfig = w / "kubeconfig"
        _write_kubeconfig(kubeconfig, server, pki / "ca.crt", token)
        cluster = Cluster(server=server, token=token, ca=pki / "ca.crt", kubeconfig=kubeconfig, workdir=w)
        cluster.pids = {"etcd": etcd.pid, "kube-apiserver": apiserver.pid}
        wait_for(
            "kube-apiserver /readyz",
            lambda: cluster.get("/readyz") == "ok",
            timeout,
            interval=0.2,
            alive=apiserver.dead,
        )

        common = [f"--kubeconfig={kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
                  "--port=0", "--logtostderr=true", "--v=0"]  # fmt: skip
        cm = Daemon(
            "kube-controller-manager",
            [str(bins["kube-controller-manager"]), *common,
             f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
             "--controllers=*,-nodeipam,-nodelifecycle,-ttl", "--use-service-account-credentials=false",
             "--concurrent-gc-syncs=5"],
            logs / "kube-controller-manager.log",
        ).start()  # fmt: skip
        self.daemons.append(cm)
        sched = Daemon(
            "kube-scheduler", [str(bins["kube-scheduler"]), *common], logs / "kube-scheduler.log"
        ).start()
        self.daemons.append(sched)
        cluster.pids.update({"kube-controller-manager": cm.pid, "kube-scheduler": sched.pid})

        def all_alive() -> str | None:
            return next((m for d in self.daemons if (m := d.dead())), None)

        # The controller-manager is working once it created the default ServiceAccount (pods
        # cannot be admitted before that).
        wait_for(
            "kube-controller-manager (default ServiceAccount)",
            lambda: cluster.get("/api/v1/namespaces/default/serviceaccounts/default").get("metadata"),
            timeout,
            interval=0.2,
            alive=all_alive,
        )
        self.cluster = cluster
        (w / "cluster.json").write_text(json.dumps(cluster.to_json(), indent=2))
        return cluster

    def dead(self) -> str | None:
        """A message if any component has exited (None while all run)."""
        return next((m for d in self.daemons if (m := d.dead())), None)

    def stop(self, keep_workdir: bool = False) -> None:
        # Clients of etcd first (together, to save time), etcd last.
        stop_all([d for d in self.daemons if d.name != "etcd"], grace=5)
        stop_all([d for d in self.daemons if d.name == "etcd"], grace=5)
        self.daemons.clear()
        if self._own_workdir and not (self.keep_workdir or keep_workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _clear(d: Path) -> None:
    for child in d.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)

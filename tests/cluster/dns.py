"""Cluster DNS for the process kubelet's pods: the records CoreDNS would serve for headless
Services, seen by each pod process through its own ``/etc/hosts``.

Why: a training gang's ranks find rank 0 by its DNS name ``<pod>.<service>`` (MASTER_ADDR).
Pods here are processes on this machine with no DNS server of their own; every pod IP is
127.0.0.1. For pods that ask for a DNS name (``spec.hostname`` + ``spec.subdomain``), the
kubelet starts the container in a private mount namespace (``unshare --mount``, or with a
user namespace when not root) where the namespace's hosts file is bind-mounted over
``/etc/hosts`` — what a real kubelet does for every container. glibc reads it on every lookup,
so records added later (a rank started before rank 0 existed) are seen; the file is rewritten
in place, never renamed, so the bind mount keeps pointing at it. (nss_wrapper was tried first:
torch's c10d store never connects under it.)

Records, as CoreDNS builds them: a pod gets ``<hostname>.<subdomain>``,
``….<namespace>.svc`` and ``….<namespace>.svc.cluster.local`` when a headless Service named
``<subdomain>`` exists in its namespace, selects the pod, and either publishes not-ready
addresses or the pod is Ready. Nothing else (Service ClusterIPs, other namespaces' short
names) is modelled.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("branchmerge.kubelet.dns")


def _unshare_prefix() -> list[str] | None:
    """How to get a private mount namespace here: as root, or through a user namespace."""
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--map-root-user", "--mount", "--propagation", "private"]):  # fmt: skip
        try:
            probe = [*prefix, "--", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"]
            if subprocess.run(probe, capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


#: None where this machine allows no mount namespace (then pod DNS names do not resolve).
UNSHARE = _unshare_prefix()
CLUSTER_DOMAIN = "cluster.local"


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in (selector or {}).items())


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def records(namespace: str, pods: list[Any], services: list[Any]) -> list[tuple[str, list[str]]]:
    """(ip, names) per pod with a DNS name, sorted; the IP is the pod's (127.0.0.1 here)."""
    headless = {s.metadata.name: s for s in services if s.spec.cluster_ip == "None"}
    out: list[tuple[str, list[str]]] = []
    for pod in pods:
        spec = pod.spec
        svc = headless.get(spec.subdomain or "")
        if not spec.hostname or svc is None or pod.metadata.deletion_timestamp:
            continue
        if pod.status.phase in ("Succeeded", "Failed"):
            continue
        if not _selects(svc.spec.selector, pod.metadata.labels):
            continue
        if not (svc.spec.publish_not_ready_addresses or _ready(pod)):
            continue
        short = f"{spec.hostname}.{spec.subdomain}"
        names = [short, f"{short}.{namespace}.svc", f"{short}.{namespace}.svc.{CLUSTER_DOMAIN}"]
        out.append((pod.status.pod_ip or "127.0.0.1", names))
    return sorted(out, key=lambda r: r[1][0])


class PodDNS:
    """One hosts file per namespace under ``directory``, rewritten in place when it changes."""

    def __init__(self, core: Any, directory: Path) -> None:
        self.core = core
        self.directory = directory
        self._lock = threading.Lock()
        self._written: dict[str, str] = {}

    def hosts_file(self, namespace: str) -> Path:
        return self.directory / f"{namespace}.hosts"

    def refresh(self, namespace: str) -> Path:
        pods = self.core.list_namespaced_pod(namespace).items
        services = self.core.list_namespaced_service(namespace).items
        own = "".join(f"{ip} {' '.join(names)}\n" for ip, names in records(namespace, pods, services))
        text = _system_hosts() + "# pods behind headless Services (tests/cluster/dns.py)\n" + own
        path = self.hosts_file(namespace)
        with self._lock:
            if self._written.get(namespace) != text or not path.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                # In place (write, then cut to length): a bind mount follows the inode, not the
                # name, and a reader never sees an empty file.
                data = text.encode()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    os.ftruncate(fd, len(data))
                finally:
                    os.close(fd)
                self._written[namespace] = text
        return path

    def wrap(self, argv: list[str], namespace: str) -> list[str]:
        """``argv`` run with the namespace's hosts file as its ``/etc/hosts``."""
        if UNSHARE is None:
            log.warning("no mount namespace available (unshare): pod DNS names will not resolve")
            return argv
        hosts = str(self.refresh(namespace))
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return [*UNSHARE, "--", "sh", "-c", script, hosts, *argv]


@functools.cache
def _system_hosts() -> str:
    """This machine's /etc/hosts, read once (every refresh starts from it)."""
    try:
        text = Path("/etc/hosts").read_text()
    except OSError:
        text = "127.0.0.1 localhost\n"
    return text if text.endswith("\n") else text + "\n"

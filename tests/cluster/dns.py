"""Cluster DNS for the process kubelet's pods: the records CoreDNS would serve for headless
Services, resolved by each pod process through nss_wrapper.

Why: a training gang's ranks find rank 0 by its DNS name ``<pod>.<service>`` (MASTER_ADDR).
Pods here are processes on this machine with no DNS server of their own; every pod IP is
127.0.0.1. For pods that ask for a DNS name (``spec.hostname`` + ``spec.subdomain``), the
kubelet runs the container with ``LD_PRELOAD=libnss_wrapper.so`` and
``NSS_WRAPPER_HOSTS=<namespace hosts file>``: glibc's ``getaddrinfo`` then answers from that
file first (re-read when it changes) and falls back to the system for everything else.

Records, as CoreDNS builds them: a pod gets ``<hostname>.<subdomain>``,
``….<namespace>.svc`` and ``….<namespace>.svc.cluster.local`` when a headless Service named
``<subdomain>`` exists in its namespace, selects the pod, and either publishes not-ready
addresses or the pod is Ready. Nothing else (Service ClusterIPs, other namespaces' short
names) is modelled.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("branchmerge.kubelet.dns")

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
    "/usr/lib/aarch64-linux-gnu/libnss_wrapper.so",
    "/usr/lib64/libnss_wrapper.so",
    "/usr/lib/libnss_wrapper.so",
)
#: Debian package `libnss-wrapper` (tests/cluster/build.sh installs it); None when absent.
NSS_WRAPPER = next((p for p in _CANDIDATES if os.path.exists(p)), None)
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
    """One hosts file per namespace under ``directory``, rewritten (atomically) when it changes."""

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
        text = "".join(f"{ip} {' '.join(names)}\n" for ip, names in records(namespace, pods, services))
        path = self.hosts_file(namespace)
        with self._lock:
            if self._written.get(namespace) != text or not path.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
                self._written[namespace] = text
        return path

    def env(self, namespace: str) -> dict[str, str]:
        """What a pod process needs to resolve these names (empty without nss_wrapper)."""
        if NSS_WRAPPER is None:
            log.warning(
                "libnss_wrapper not installed: pod DNS names will not resolve (apt-get install libnss-wrapper)"
            )
            return {}
        return {"LD_PRELOAD": NSS_WRAPPER, "NSS_WRAPPER_HOSTS": str(self.refresh(namespace))}

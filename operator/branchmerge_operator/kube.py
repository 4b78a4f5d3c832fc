"""A small asynchronous Kubernetes API client for the operator's writes and log reads.

Why not the official client: it is synchronous (a reconcile would block kopf's event loop or
need a thread per request) and heavy to import. Why not kopf's own client: it is private API.
The operator needs six calls — create, delete, merge-patch, patch status, read a pod log and
(for tests) get — so this module implements them over aiohttp, which kopf already depends on,
with the credentials kopf resolved at login (``kopf.ConnectionInfo``).

Every request is counted by verb, resource and status code (``metrics.API_REQUESTS``), which
is how the benchmark reports API writes per Distillation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from . import metrics

log = logging.getLogger("branchmerge.kube")

#: Retried statuses: throttling and transient server errors (a write is retried only when the
#: server certainly did not apply it — 429/503 — or when a retry is harmless for that verb).
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_BACKOFFS = (0.2, 0.5, 1.0, 2.0)
#: Concurrent connections to the API server (a burst of reconciles is latency-bound).
CONNECTIONS = 16


class ApiError(Exception):
    """A non-success response, with the server's reason (``AlreadyExists``, ``NotFound``, …)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    """Where one API server is and how to authenticate (a subset of kopf.ConnectionInfo)."""

    server: str
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    token: str | None = None
    scheme: str | None = None
    username: str | None = None
    password: str | None = None
    certificate_path: str | None = None
    certificate_data: bytes | None = None
    private_key_path: str | None = None
    private_key_data: bytes | None = None

    @classmethod
    def from_connection_info(cls, info: Any) -> Endpoint:
        """From a ``kopf.ConnectionInfo`` (duck-typed so that tests need no kopf login)."""

        def as_bytes(value: Any) -> bytes | None:
            if value is None:
                return None
            if isinstance(value, bytes):
                # kubeconfig *-data fields are base64; kopf passes them through undecoded.
                return value
            text = str(value)
            if "-----BEGIN" in text:
                return text.encode()
            return base64.b64decode(text)

        def as_path(value: Any) -> str | None:
            return None if value is None else os.fsdecode(value)

        return cls(
            server=str(info.server).rstrip("/"),
            ca_path=as_path(info.ca_path),
            ca_data=as_bytes(info.ca_data),
            insecure=bool(info.insecure),
            token=info.token,
            scheme=info.scheme,
            username=info.username,
            password=info.password,
            certificate_path=as_path(info.certificate_path),
            certificate_data=as_bytes(info.certificate_data),
            private_key_path=as_path(info.private_key_path),
            private_key_data=as_bytes(info.private_key_data),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(
                cafile=self.ca_path, cadata=self.ca_data.decode() if self.ca_data else None
            )
        cert, key = self.certificate_path, self.private_key_path
        if self.certificate_data or self.private_key_data:
            # ssl loads client certificates from files only: write them to private temp files.
            cert = cert or _private_file(self.certificate_data or b"")
            key = key or _private_file(self.private_key_data or b"")
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx

    def headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"{self.scheme or 'Bearer'} {self.token}"}
        if self.username and self.password:
            raw = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return {}


def _private_file(data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="branchmerge-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------- paths

#: kind -> (API prefix, plural); namespaced resources only.
RESOURCES: dict[str, tuple[str, str]] = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Distillation": ("/apis/branchmerge.io/v1alpha1", "distillations"),
    "BranchJob": ("/apis/branchmerge.io/v1alpha1", "branchjobs"),
}


def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    out = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name is not None:
        out += f"/{quote(name)}"
    if subresource is not None:
        out += f"/{subresource}"
    return out


def _resource_label(url_path: str) -> str:
    """`/api/v1/namespaces/ns/pods/x/log` -> `pods/log` (low-cardinality metric label)."""
    parts = [p for p in url_path.split("?")[0].split("/") if p]
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if not rest:
        return "namespaces"
    return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")


# --------------------------------------------------------------------------- client


class KubeClient:
    """One aiohttp session to one API server. ``relogin`` is called once after a 401 (a rotated
    service-account token) and must return fresh credentials or None."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        relogin: Callable[[], Endpoint | None] | None = None,
        timeout: float = 30.0,
        field_manager: str = "branchmerge-operator",
    ) -> None:
        self.endpoint = endpoint
        self._relogin = relogin
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self.field_manager = field_manager

    async def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(ssl=self.endpoint.ssl_context(), limit=CONNECTIONS)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._session_loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        url_path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        content_type: str = "application/json",
        text: bool = False,
    ) -> Any:
        """Send one request (retrying throttling and transient errors); JSON or text back."""
        query = dict(params or {})
        if method in ("POST", "PATCH", "PUT"):
            query.setdefault("fieldManager", self.field_manager)
        url = self.endpoint.server + url_path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body)
        resource = _resource_label(url_path)
        relogged = False
        attempt = 0
        while True:
            session = await self._get_session()
            headers = {"Accept": "*/*" if text else "application/json", **self.endpoint.headers()}
            if data is not None:
                headers["Content-Type"] = content_type
            started = asyncio.get_running_loop().time()
            try:
                async with session.request(method, url, data=data, headers=headers) as resp:
                    status = resp.status
                    payload = await resp.text()
                metrics.API_SECONDS.labels(method).observe(asyncio.get_running_loop().time() - started)
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                metrics.API_REQUESTS.labels(method, resource, "error").inc()
                if attempt < len(_BACKOFFS):
                    await asyncio.sleep(_BACKOFFS[attempt])
                    attempt += 1
                    continue
                raise ApiError(0, "ConnectionError", str(e) or e.__class__.__name__) from e
            metrics.API_REQUESTS.labels(method, resource, str(status)).inc()
            if status == 401 and not relogged and self._relogin is not None:
                fresh = self._relogin()
                relogged = True
                if fresh is not None:
                    self.endpoint = fresh
                    continue
            if status in _RETRY_STATUSES and attempt < len(_BACKOFFS):
                await asyncio.sleep(_BACKOFFS[attempt])
                attempt += 1
                continue
            if status >= 400:
                raise _error(status, payload)
            if text:
                return payload
            return json.loads(payload) if payload else None

    # ------------------------------------------------------------------ verbs

    async def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", path(kind, namespace), body=body)
        return result

    async def delete(
        self, kind: str, namespace: str, name: str, *, propagation: str = "Background", uid: str | None = None
    ) -> bool:
        """Delete; False when it was already gone. ``uid`` guards against deleting a newer
        object that reuses the name."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path(kind, namespace, name), body=options)
        except ApiError as e:
            if e.status in (404, 409):  # gone, or already replaced by another uid
                return False
            raise
        return True

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH",
            path(kind, namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
        )
        return result

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", path(kind, namespace, name))
        return result

    async def pod_log(
        self, namespace: str, name: str, *, container: str, tail_lines: int = 40, limit_bytes: int = 32768
    ) -> str:
        """The last lines of a container's log (RBAC: pods/log get)."""
        result: str = await self.request(
            "GET",
            path("Pod", namespace, name, "log"),
            params={"container": container, "tailLines": tail_lines, "limitBytes": limit_bytes},
            text=True,
        )
        return result


def _error(status: int, payload: str) -> ApiError:
    try:
        data = json.loads(payload)
        return ApiError(status, str(data.get("reason") or status), str(data.get("message") or payload))
    except ValueError:
        return ApiError(status, str(status), payload[:500])

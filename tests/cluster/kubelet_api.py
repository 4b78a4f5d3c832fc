"""The part of the kubelet's HTTPS API the API server proxies to: container logs.

Why: ``kubectl logs`` and the operator's progress reader (``GET pods/log``) go through the API
server, which connects to the node's ``daemonEndpoints.kubeletEndpoint.Port`` on its
``InternalIP`` and asks for ``/containerLogs/<namespace>/<pod>/<container>``. Serving that
lets tests exercise the real log path end to end instead of reading the kubelet's files.

Supported query parameters, as the real kubelet: ``tailLines``, ``limitBytes`` (applied after
``tailLines``), ``follow`` (stream until the container exits). ``timestamps``, ``previous``
and ``sinceSeconds`` are accepted and ignored (this kubelet keeps one log per container and no
per-line times). The API server is started without ``--kubelet-certificate-authority``, so it
does not verify this self-signed serving certificate, and no client certificate is asked for:
loopback only, tests only.
"""

from __future__ import annotations

import http.server
import re
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

#: (namespace, pod, container) -> the log file and whether the container is still running
LogLookup = Callable[[str, str, str], "tuple[Path, bool] | None"]

_PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")


def tail(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The last ``tail_lines`` lines, then at most ``limit_bytes`` bytes from their start."""
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A serving certificate for 127.0.0.1 (EC P-256: fast to make)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not crt.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "30", "-subj", "/CN=process-kubelet", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(crt)],
            check=True, capture_output=True,
        )  # fmt: skip
    return crt, key


class KubeletAPI:
    """A threaded HTTPS server on 127.0.0.1 (random port) answering ``/containerLogs``."""

    def __init__(self, lookup: LogLookup, cert_dir: Path, poll_s: float = 0.2) -> None:
        crt, key = self_signed(cert_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes (follow)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

            def do_GET(self) -> None:
                api._serve(self)

        self.lookup = lookup
        self.poll_s = poll_s
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="kubelet-api", daemon=True)

    def start(self) -> KubeletAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        match = _PATH.match(url.path)
        if url.path == "/healthz":
            self._reply(req, 200, b"ok")
            return
        if not match:
            self._reply(req, 404, b"not found")
            return
        q = urllib.parse.parse_qs(url.query)
        try:
            tail_lines = int(q["tailLines"][0]) if "tailLines" in q else None
            limit_bytes = int(q["limitBytes"][0]) if "limitBytes" in q else None
        except ValueError:
            self._reply(req, 400, b"tailLines and limitBytes must be integers")
            return
        follow = q.get("follow", ["false"])[0] == "true"
        ns, pod, container = (urllib.parse.unquote(p) for p in match.groups())
        found = self.lookup(ns, pod, container)
        if found is None:
            self._reply(req, 404, f"container {container!r} of pod {ns}/{pod} is not on this node".encode())
            return
        path, running = found
        data = path.read_bytes() if path.exists() else b""
        body = tail(data, tail_lines, limit_bytes)
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.end_headers()
        req.wfile.write(body)
        if not follow:
            return
        sent, offset = len(body), len(data)
        while running and (limit_bytes is None or sent < limit_bytes):
            time.sleep(self.poll_s)
            again = self.lookup(ns, pod, container)
            running = bool(again and again[1])
            more = path.read_bytes()[offset:] if path.exists() else b""
            if limit_bytes is not None:
                more = more[: limit_bytes - sent]
            if more:
                try:
                    req.wfile.write(more)
                    req.wfile.flush()
                except OSError:  # the client went away
                    return
                offset += len(more)
                sent += len(more)

    @staticmethod
    def _reply(req: http.server.BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

"""S3 on loopback: a real Ceph radosgw (credentials enforced) and moto's server (fast, permissive).

Why radosgw: tests must prove that credentials flow from a Secret into pods, so the server
has to reject wrong keys; moto accepts anything. The Ceph cluster is as small as it gets:
one monitor, one OSD on ``memstore`` (RAM), no manager, auth off between daemons, every
file under one temporary directory. Recipe facts: ``../shared/reference/kubernetes.md``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import PORT_RACE, Daemon, free_port, rss_mib, run, stop_all, wait_for

CEPH_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
BUILD_HINT = (
    "run `tests/cluster/build.sh` (installs Debian's ceph-mon ceph-osd radosgw), "
    "or `apt-get install --no-install-recommends ceph-mon ceph-osd radosgw`"
)


class S3NotAvailable(RuntimeError):
    """Ceph binaries are missing: the message says how to install them."""


@dataclass
class S3Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """As pods and boto3 read them."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


@dataclass
class S3Server:
    """An S3 endpoint with admin credentials, and helpers to make buckets, users and Secrets."""

    endpoint: str
    credentials: S3Credentials
    region: str = "us-east-1"
    workdir: Path | None = None
    pids: dict[str, int] = field(default_factory=dict)
    _admin: Any = field(default=None, repr=False)  # callable(uid, access, secret) creating a user, or None

    @property
    def access_key(self) -> str:
        return self.credentials.access_key

    @property
    def secret_key(self) -> str:
        return self.credentials.secret_key

    def client(self, credentials: S3Credentials | None = None) -> Any:
        """A boto3 S3 client for this endpoint (path-style addressing)."""
        import boto3
        from botocore.config import Config

        c = credentials or self.credentials
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=c.access_key,
            aws_secret_access_key=c.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def create_user(self, uid: str | None = None) -> S3Credentials:
        """New S3 credentials (a separate radosgw user; on moto any keys work)."""
        creds = S3Credentials(f"AK{secrets.token_hex(9).upper()}", secrets.token_hex(20))
        if self._admin is not None:
            self._admin(uid or f"user-{secrets.token_hex(4)}", creds)
        return creds

    def env(self, credentials: S3Credentials | None = None) -> dict[str, str]:
        """Environment for a process that talks to this S3 server with boto3/our storage layer."""
        return {
            **(credentials or self.credentials).env(),
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def create_secret(
        self,
        api_client: Any,
        namespace: str,
        name: str = "s3-credentials",
        credentials: S3Credentials | None = None,
        with_endpoint: bool = False,
    ) -> str:
        """Store credentials in a Kubernetes Secret (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``),
        the way production hands them to pods; ``with_endpoint`` also adds ``AWS_ENDPOINT_URL``."""
        from kubernetes import client

        data = (credentials or self.credentials).env()
        if with_endpoint:
            data["AWS_ENDPOINT_URL"] = self.endpoint
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "Opaque",
            "stringData": data,
        }
        client.CoreV1Api(api_client).create_namespaced_secret(namespace, body)
        return name

    def rss_mib(self) -> dict[str, float]:
        return {n: round(rss_mib(p), 1) for n, p in self.pids.items()}


def _ceph_conf(d: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 256
osd max object namespace len = 64
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$cluster-$name.pid
log file = {d}/log/$cluster-$name.log
mon cluster log file = {d}/log/$cluster.log
crash dir = {d}/crash
exporter sock dir = {d}/run
keyring = {d}/keyring
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
debug ms = 0
mon osd full ratio = 0.99
mon osd nearfull ratio = 0.98
osd failsafe full ratio = 0.995

[client]
# radosgw forces ms_mon_client_mode = secure, which never connects with auth off.
ms mon client mode = crc secure
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {d}/rgw
rgw enable usage log = false
rgw thread pool size = 32
rgw dns name = 127.0.0.1
"""


class Radosgw:
    """Start/stop a one-monitor, one-memstore-OSD Ceph cluster with radosgw on a free loopback port."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._own = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="branchmerge-s3-"))
        self.daemons: list[Daemon] = []
        self.server: S3Server | None = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> S3Server:
        missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
        if missing:
            raise S3NotAvailable(
                f"S3 server (Ceph radosgw) not available, missing {', '.join(missing)}; {BUILD_HINT}"
            )
        for attempt in range(3):
            try:
                return self._start(timeout)
            except BaseException as e:
                self.stop(keep_workdir=True)
                if PORT_RACE in str(e).lower() and attempt < 2:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    continue
                e.add_note(f"Ceph logs kept in {self.workdir / 'log'}")
                raise
        raise AssertionError("unreachable")

    def _ceph(self, *args: str, timeout: float = 30) -> str:
        return run(["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args], timeout=timeout)

    def _start(self, timeout: float) -> S3Server:
        d = self.workdir
        for sub in ("run", "log", "crash", "mon", "osd", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.conf = d / "ceph.conf"
        self.conf.write_text(_ceph_conf(d, fsid, mon_port, rgw_port))
        conf = ["-c", str(self.conf)]

        run(
            [
                "monmaptool",
                *conf,
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{mon_port}]",
                str(d / "monmap"),
            ]
        )
        run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap")])
        mon = Daemon("ceph-mon", ["ceph-mon", *conf, "-f", "-i", "a"], d / "log" / "ceph-mon.out").start()
        self.daemons.append(mon)
        wait_for(
            "ceph-mon quorum",
            lambda: "quorum" in self._ceph("mon", "stat", timeout=25),
            timeout,
            0.5,
            mon.dead,
        )

        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        (d / "osd" / f"ceph-{osd_id}").mkdir(parents=True, exist_ok=True)
        run(["ceph-osd", *conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        osd = Daemon("ceph-osd", ["ceph-osd", *conf, "-f", "-i", osd_id], d / "log" / "ceph-osd.out").start()
        self.daemons.append(osd)

        def osd_up() -> bool:
            return '"num_up_osds":1' in self._ceph("osd", "stat", "--format=json").replace(" ", "")

        wait_for("ceph-osd up", osd_up, timeout, 0.5, osd.dead)

        rgw = Daemon(
            "radosgw",
            ["radosgw", *conf, "-f", "-n", "client.rgw", "--rgw-data", str(d / "rgw")],
            d / "log" / "radosgw.out",
        ).start()
        self.daemons.append(rgw)
        endpoint = f"http://127.0.0.1:{rgw_port}"

        def rgw_up() -> bool:
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=2) as r:
                    return r.status == 200
            except urllib.error.HTTPError as e:
                return e.code in (403, 404)

        wait_for("radosgw HTTP", rgw_up, timeout, 0.3, rgw.dead)

        def admin(uid: str, creds: S3Credentials) -> None:
            argv = ["radosgw-admin", *conf, "-n", "client.admin", "user", "create", f"--uid={uid}",
                    f"--display-name={uid}", f"--access-key={creds.access_key}", f"--secret={creds.secret_key}"]  # fmt: skip
            run(argv, timeout=60)

        admin_creds = S3Credentials(f"AK{secrets.token_hex(9).upper()}", secrets.token_hex(20))
        admin("admin", admin_creds)
        server = S3Server(endpoint=endpoint, credentials=admin_creds, workdir=d, _admin=admin)
        server.pids = {"ceph-mon": mon.pid, "ceph-osd": osd.pid, "radosgw": rgw.pid}
        # radosgw answers HTTP before its first user/bucket operations settle; wait for a real request.
        wait_for("radosgw ListBuckets", lambda: server.client().list_buckets() is not None, 30, 0.3, rgw.dead)
        self.server = server
        return server

    def dead(self) -> str | None:
        return next((m for dmn in self.daemons if (m := dmn.dead())), None)

    def stop(self, keep_workdir: bool = False) -> None:
        stop_all(list(reversed(self.daemons)), grace=5)
        self.daemons.clear()
        if self._own and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class MotoS3:
    """moto's threaded S3 server on a free loopback port: fast, but it accepts any credentials."""

    def __init__(self) -> None:
        self._server: Any = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        endpoint = f"http://127.0.0.1:{port}"
        server = S3Server(endpoint=endpoint, credentials=S3Credentials("testing", "testing"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            time.sleep(0.05)
        return server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

"""Object storage over ``file://`` (and plain paths) and ``s3://``, with atomic publish.

Every stage output is a *prefix*: its files first, then ``_MANIFEST.json`` (file list, sizes,
sha256, fingerprint, metrics). Readers trust only prefixes that have a manifest, so a stage
that dies half-way leaves nothing anyone will read. S3 credentials come from the environment
(a referenced Kubernetes Secret in the cluster); they never appear in configs or logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import Field

from .stages import Model, StorageConfig

MANIFEST = "_MANIFEST.json"
_CHUNK = 8 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to check."""


class NotCommittedError(StorageError):
    """The prefix has no manifest (or a corrupt one): its stage did not finish."""


class ChecksumError(StorageError):
    """A file's content does not match the manifest."""


class FileEntry(Model):
    path: str
    size: int
    sha256: str


class Manifest(Model):
    api_version: Literal["branchmerge.io/v1alpha1"] = "branchmerge.io/v1alpha1"
    kind: Literal["Manifest"] = "Manifest"
    fingerprint: str
    stage: str = ""
    created_at: float = Field(default_factory=time.time)
    files: list[FileEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the listed prefix, '/'-separated
    size: int


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with single slashes."""
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Storage(ABC):
    """The operations stages need. URIs are absolute (``s3://b/k``, ``file:///p`` or ``/p``)."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def read_range(self, uri: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def open_read(self, uri: str) -> BinaryIO:
        """A streaming reader (no full download)."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, local: Path, uri: str) -> None: ...

    @abstractmethod
    def download_file(self, uri: str, local: Path) -> None: ...

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def size(self, uri: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under ``prefix/`` (recursive), keys relative to it, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def local_path(self, uri: str) -> Path | None:
        """The file system path of a URI when no copy is needed, else None."""
        return None

    # ------------------------------------------------------------------ manifests

    def read_manifest(self, prefix: str) -> Manifest:
        uri = join(prefix, MANIFEST)
        try:
            raw = self.read_bytes(uri)
        except FileNotFoundError as e:
            raise NotCommittedError(
                f"{prefix}: no {MANIFEST}; the stage that writes it has not finished (or failed)"
            ) from e
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as e:
            raise NotCommittedError(f"{uri}: corrupt manifest ({e.__class__.__name__})") from e

    def committed(self, prefix: str, fingerprint: str | None = None) -> Manifest | None:
        """The manifest when the prefix is committed (with that fingerprint), else None."""
        try:
            m = self.read_manifest(prefix)
        except NotCommittedError:
            return None
        if fingerprint is not None and m.fingerprint != fingerprint:
            return None
        return m

    def publish_dir(
        self,
        local_dir: Path,
        prefix: str,
        *,
        fingerprint: str,
        stage: str = "",
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> Manifest:
        """Upload every file of ``local_dir`` under ``prefix``, then the manifest last.

        ``digests`` (relative path -> sha256) are hashes the caller computed while writing
        the files, so large outputs are not read back just to hash them."""
        files: list[FileEntry] = []
        known = digests or {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST:
                continue
            digest = known.get(rel) or sha256_file(path)
            files.append(FileEntry(path=rel, size=path.stat().st_size, sha256=digest))
            self.upload_file(path, join(prefix, rel))
        manifest = Manifest(
            fingerprint=fingerprint, stage=stage, files=files, metrics=metrics or {}, extra=extra or {}
        )
        self.write_bytes(join(prefix, MANIFEST), manifest.model_dump_json(by_alias=True, indent=1).encode())
        return manifest

    def fetch_dir(self, prefix: str, local_dir: Path, *, verify: bool = True) -> Manifest:
        """Download a committed prefix, checking sizes (and sha256 when ``verify``)."""
        manifest = self.read_manifest(prefix)
        local_dir.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            dest = local_dir / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(join(prefix, entry.path), dest)
            check_entry(dest, entry, verify=verify, where=join(prefix, entry.path))
        return manifest

    def materialize(self, prefix: str, cache_dir: Path, *, verify: bool = True) -> tuple[Path, Manifest]:
        """A local directory holding the committed prefix: in place for local storage,
        otherwise downloaded (once) into ``cache_dir/<fingerprint>``."""
        local = self.local_path(prefix)
        if local is not None:
            manifest = self.read_manifest(prefix)
            for entry in manifest.files:
                check_entry(local / entry.path, entry, verify=verify, where=join(prefix, entry.path))
            return local, manifest
        manifest = self.read_manifest(prefix)
        dest = cache_dir / manifest.fingerprint
        done = dest / MANIFEST
        if done.exists() and Manifest.model_validate_json(done.read_bytes()) == manifest:
            return dest, manifest
        if dest.exists():
            shutil.rmtree(dest)
        self.fetch_dir(prefix, dest, verify=verify)
        done.write_bytes(manifest.model_dump_json(by_alias=True).encode())
        return dest, manifest


def check_entry(path: Path, entry: FileEntry, *, verify: bool, where: str) -> None:
    if not path.exists():
        raise ChecksumError(f"{where}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry.size:
        raise ChecksumError(f"{where}: size {size} != manifest size {entry.size} (corrupt or partial)")
    if verify and sha256_file(path) != entry.sha256:
        raise ChecksumError(f"{where}: sha256 mismatch with the manifest (corrupt)")


# --------------------------------------------------------------------------- file


def _path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return Path(uri)


class LocalStorage(Storage):
    """``file://`` URIs and plain paths (a mounted volume). Writes go through a temp file
    and ``os.replace`` so a reader never sees half a file."""

    def read_bytes(self, uri: str) -> bytes:
        return _path(uri).read_bytes()

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        with _path(uri).open("rb") as f:
            f.seek(start)
            return f.read(length)

    def open_read(self, uri: str) -> BinaryIO:
        return _path(uri).open("rb")

    def _atomic(self, dest: Path) -> tuple[int, str]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")

    def write_bytes(self, uri: str, data: bytes) -> None:
        dest = _path(uri)
        fd, tmp = self._atomic(dest)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)

    def upload_file(self, local: Path, uri: str) -> None:
        dest = _path(uri)
        if dest.resolve() == local.resolve():
            return
        fd, tmp = self._atomic(dest)
        os.close(fd)
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def download_file(self, uri: str, local: Path) -> None:
        src = _path(uri)
        if not src.exists():
            raise FileNotFoundError(uri)
        if src.resolve() != local.resolve():
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, local)

    def exists(self, uri: str) -> bool:
        return _path(uri).exists()

    def size(self, uri: str) -> int:
        return _path(uri).stat().st_size

    def list(self, prefix: str) -> list[ObjectInfo]:
        root = _path(prefix)
        if root.is_file():
            return [ObjectInfo(key="", size=root.stat().st_size)]
        if not root.is_dir():
            return []
        return [
            ObjectInfo(key=p.relative_to(root).as_posix(), size=p.stat().st_size)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")
        ]

    def delete_prefix(self, prefix: str) -> None:
        root = _path(prefix)
        if root.is_dir():
            shutil.rmtree(root)
        elif root.exists():
            root.unlink()

    def local_path(self, uri: str) -> Path | None:
        return _path(uri)


# --------------------------------------------------------------------------- s3


def _split(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


class S3Storage(Storage):
    """boto3 with retries (standard mode) and managed multipart transfers."""

    def __init__(self, config: StorageConfig | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = config or StorageConfig()
        endpoint = config.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=config.region or os.environ.get("AWS_REGION") or "us-east-1",
            config=Config(
                retries={"max_attempts": 8, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=10,
                read_timeout=120,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=4
        )

    def _wrap(self, uri: str, exc: Exception) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                return FileNotFoundError(uri)
            if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
                return StorageError(
                    f"{uri}: access denied ({code}); check the credentials Secret "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket policy"
                )
            if code == "NoSuchBucket":
                return StorageError(f"{uri}: bucket does not exist; create it or fix output.uri")
        return StorageError(f"{uri}: {exc.__class__.__name__}: {exc}")

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = _split(uri)
        try:
            return bytes(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as e:
            raise self._wrap(uri, e) from e

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        bucket, key = _split(uri)
        try:
            resp = self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            return bytes(resp["Body"].read())
        except Exception as e:
            raise self._wrap(uri, e) from e

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = _split(uri)
        try:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise self._wrap(uri, e) from e
        return io.BufferedReader(_StreamReader(body), buffer_size=_CHUNK)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split(uri)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise self._wrap(uri, e) from e

    def upload_file(self, local: Path, uri: str) -> None:
        bucket, key = _split(uri)
        try:
            self._client.upload_file(str(local), bucket, key, Config=self._transfer)
        except Exception as e:
            raise self._wrap(uri, e) from e

    def download_file(self, uri: str, local: Path) -> None:
        bucket, key = _split(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self._client.download_file(bucket, key, str(tmp), Config=self._transfer)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise self._wrap(uri, e) from e
        os.replace(tmp, local)

    def exists(self, uri: str) -> bool:
        try:
            self.size(uri)
            return True
        except FileNotFoundError:
            return False

    def size(self, uri: str) -> int:
        bucket, key = _split(uri)
        try:
            return int(self._client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as e:
            raise self._wrap(uri, e) from e

    def list(self, prefix: str) -> list[ObjectInfo]:
        bucket, key = _split(prefix)
        base = key.rstrip("/") + "/" if key else ""
        out: list[ObjectInfo] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(key=obj["Key"][len(base) :], size=int(obj["Size"])))
        except Exception as e:
            raise self._wrap(prefix, e) from e
        return sorted(out, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        bucket, key = _split(prefix)
        objs = self.list(prefix)
        base = key.rstrip("/") + "/" if key else ""
        for i in range(0, len(objs), 1000):
            batch = [{"Key": base + o.key} for o in objs[i : i + 1000]]
            try:
                self._client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                raise self._wrap(prefix, e) from e


class _StreamReader(io.RawIOBase):
    """A file-like view of a botocore streaming body."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._body.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        self._body.close()
        super().close()


# --------------------------------------------------------------------------- dispatch


def storage_for(uri: str, config: StorageConfig | None = None) -> Storage:
    """The backend for a URI's scheme."""
    if uri.startswith("s3://"):
        return S3Storage(config)
    if uri.startswith("file://") or uri.startswith("/"):
        return LocalStorage()
    raise StorageError(f"{uri!r}: unsupported URI; use s3://bucket/prefix, file:///path or /path")


def iter_chunks(stream: BinaryIO, size: int = _CHUNK) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def dump_json(storage: Storage, uri: str, data: Any) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=1, sort_keys=True).encode())


def materialize_model(storage: Storage, uri: str, cache_dir: Path, *, verify: bool = True) -> Path:
    """A local directory holding the model at ``uri``.

    A committed prefix (a stage's output) is checked against its manifest. A *local* directory
    with no manifest at all but a ``config.json`` is a plain Hugging Face checkpoint that the
    user supplied (e.g. the student) and is used as it is. A corrupt manifest still fails.
    """
    local = storage.local_path(uri)
    if local is not None and not (local / MANIFEST).exists() and (local / "config.json").is_file():
        return local
    path, _ = storage.materialize(uri, cache_dir, verify=verify)
    return path

"""Storage contract on file:// and on an S3 server (moto's, for speed; radosgw in integration)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchmerge_trainer.stages import StorageConfig
from branchmerge_trainer.storage import (
    ChecksumError,
    LocalStorage,
    NotCommittedError,
    S3Storage,
    Storage,
    join,
    storage_for,
)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Storage, str]:
    if request.param == "file":
        return LocalStorage(), f"file://{tmp_path}/out"
    endpoint = request.getfixturevalue("moto_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s = S3Storage(StorageConfig(endpoint=endpoint))
    bucket = f"b-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}"
    s._client.create_bucket(Bucket=bucket)
    return s, f"s3://{bucket}/out"


def _make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(1000))
    (root / "sub" / "b.txt").write_text("hello")
    return root


def test_publish_then_read(backend: tuple[Storage, str], tmp_path: Path) -> None:
    storage, prefix = backend
    src = _make_dir(tmp_path / "src")
    assert storage.committed(prefix) is None
    manifest = storage.publish_dir(src, prefix, fingerprint="fp1", stage="t", metrics={"loss": 1.5})
    assert [f.path for f in manifest.files] == ["a.bin", "sub/b.txt"]
    assert storage.committed(prefix, "fp1") is not None
    assert storage.committed(prefix, "other") is None
    got = storage.fetch_dir(prefix, tmp_path / "dst")
    assert got.metrics == {"loss": 1.5}
    assert (tmp_path / "dst" / "sub" / "b.txt").read_text() == "hello"
    assert storage.read_range(join(prefix, "a.bin"), 10, 5) == (src / "a.bin").read_bytes()[10:15]
    with storage.open_read(join(prefix, "sub/b.txt")) as f:
        assert f.read() == b"hello"
    assert [o.key for o in storage.list(prefix)] == ["_MANIFEST.json", "a.bin", "sub/b.txt"]
    storage.delete_prefix(prefix)
    assert storage.list(prefix) == []


def test_prefix_without_manifest_is_refused(backend: tuple[Storage, str], tmp_path: Path) -> None:
    storage, prefix = backend
    storage.write_bytes(join(prefix, "model.safetensors"), b"partial")
    with pytest.raises(NotCommittedError, match=r"no _MANIFEST\.json"):
        storage.fetch_dir(prefix, tmp_path / "dst")


def test_checksum_mismatch_is_refused(backend: tuple[Storage, str], tmp_path: Path) -> None:
    storage, prefix = backend
    src = _make_dir(tmp_path / "src")
    storage.publish_dir(src, prefix, fingerprint="fp")
    storage.write_bytes(join(prefix, "sub/b.txt"), b"HELLO")  # same size, other content
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        storage.fetch_dir(prefix, tmp_path / "dst")


def test_wrong_scheme_names_the_fix() -> None:
    with pytest.raises(Exception, match="unsupported URI"):
        storage_for("gs://bucket/x")


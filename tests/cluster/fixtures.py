"""pytest fixtures for the real control plane, the process kubelet and S3 (registered in tests/conftest.py).

Session scope: ``cluster`` (control plane + node ``node-1`` with 16 CPU, 64Gi, 8 GPUs),
``k8s_api`` (an ApiClient), ``s3`` (Ceph radosgw), ``moto_s3`` (moto, any credentials).
Function scope: ``namespace`` (a fresh namespace, deleted afterwards), ``s3_bucket``,
``s3_secret`` (credentials Secret in ``namespace``), ``node_factory`` (extra nodes).

Missing binaries make the fixtures *fail* with the command to run, never skip: a test that
needs a real API server and silently does not run proves nothing.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .controlplane import Cluster, ControlPlane, HarnessNotBuilt
from .kubelet import ProcessKubelet
from .s3 import MotoS3, Radosgw, S3NotAvailable, S3Server

#: Defaults of the session node; override with these environment variables.
NODE_CPU = os.environ.get("BRANCHMERGE_TEST_NODE_CPU", "16")
NODE_MEMORY = os.environ.get("BRANCHMERGE_TEST_NODE_MEMORY", "64Gi")
NODE_GPUS = int(os.environ.get("BRANCHMERGE_TEST_NODE_GPUS", "8"))


def start_node(cluster: Cluster, name: str, **kwargs: Any) -> ProcessKubelet:
    """Register and start a process kubelet for ``cluster`` (kwargs: cpu, memory, gpus, labels, …)."""
    kubelet = ProcessKubelet(cluster.api_client, cluster.workdir / "kubelet" / name, node_name=name, **kwargs)
    return kubelet.start()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real control plane with one process-kubelet node (``cluster.kubelet``), for the whole session."""
    workdir = tmp_path_factory.mktemp("k8s")
    cp = ControlPlane(workdir)
    try:
        c = cp.start()
    except HarnessNotBuilt as e:
        pytest.fail(str(e), pytrace=False)
    try:
        c.kubelet = start_node(c, "node-1", cpu=NODE_CPU, memory=NODE_MEMORY, gpus=NODE_GPUS)
        yield c
    finally:
        if c.kubelet is not None:
            c.kubelet.stop()
        cp.stop()


@pytest.fixture(scope="session")
def k8s_api(cluster: Cluster) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` with admin rights on the session cluster."""
    api = cluster.api_client()
    try:
        yield api
    finally:
        api.close()


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "t"
    return f"{base}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: Cluster, k8s_api: Any) -> Iterator[str]:
    """A fresh namespace named after the test (its ``default`` ServiceAccount exists); deleted afterwards."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(k8s_api)
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name, "labels": {"branchmerge.io/test": "true"}}})
    # Pods are refused until the ServiceAccount controller made "default" (and its token Secret).
    deadline = time.monotonic() + 30
    while True:
        try:
            sa = core.read_namespaced_service_account("default", name)
            if sa.secrets:
                break
        except ApiException as e:
            if e.status != 404:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"ServiceAccount default/{name} was not created")
        time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def node_factory(cluster: Cluster) -> Iterator[Callable[..., ProcessKubelet]]:
    """Start extra process-kubelet nodes for one test: ``node_factory("node-2", gpus=4)``.
    They are stopped and their Node objects deleted at the end of the test."""
    from kubernetes import client

    started: list[ProcessKubelet] = []

    def make(name: str, **kwargs: Any) -> ProcessKubelet:
        kubelet = start_node(cluster, name, **kwargs)
        started.append(kubelet)
        return kubelet

    try:
        yield make
    finally:
        with cluster.api_client() as api:
            core = client.CoreV1Api(api)
            for k in started:
                k.stop()
                core.delete_node(k.node_name)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (Ceph radosgw) that enforces credentials, for the whole session.

    ``s3.endpoint``, ``s3.credentials`` (admin), ``s3.client()``, ``s3.create_bucket()``,
    ``s3.create_user()``, ``s3.create_secret(api, namespace)``, ``s3.env()``.
    """
    # Radosgw() uses a short /tmp directory: Ceph's admin-socket paths must stay short.
    rgw = Radosgw()
    try:
        server = rgw.start()
    except S3NotAvailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        rgw.stop()


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A new, empty bucket on the radosgw server (owned by the admin user)."""
    return s3.create_bucket()


@pytest.fixture
def s3_secret(s3: S3Server, k8s_api: Any, namespace: str) -> str:
    """Name of a Secret in ``namespace`` holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for ``s3``."""
    return s3.create_secret(k8s_api, namespace)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server on loopback (fast; accepts any credentials) — for unit tests of storage code."""
    moto = MotoS3()
    server = moto.start()
    try:
        yield server
    finally:
        moto.stop()

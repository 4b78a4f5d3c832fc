"""The operator runs a whole Distillation with exactly the RBAC that ships
(manifests/rbac/cluster-wide/clusterrole.yaml), as a ServiceAccount — no Secrets access, no
write access beyond what the ClusterRole grants; any missing verb would show up as a 403."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster import Cluster, ProcessKubelet
from tests.cluster.procs import free_port
from tests.operator_kit import (
    REPO,
    Api,
    FakeStages,
    OperatorProcess,
    apply,
    describe,
    install_crds,
    wait_events,
    wait_for,
)

pytestmark = [pytest.mark.cluster]


def service_account_kubeconfig(cluster: Cluster, k8s_api: Any, ns: str, role_name: str, path: Path) -> Path:
    """A ServiceAccount bound to a copy of the shipped ClusterRole, and a kubeconfig with its token."""
    core = client.CoreV1Api(k8s_api)
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "operator"}})
    role = yaml.safe_load((REPO / "manifests/rbac/cluster-wide/clusterrole.yaml").read_text())
    role["metadata"]["name"] = role_name
    rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding({
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}],
    })
    secret_name = wait_for("ServiceAccount token", lambda: (
        (sa := core.read_namespaced_service_account("operator", ns)).secrets and sa.secrets[0].name), 30)
    token = base64.b64decode(core.read_namespaced_secret(secret_name, ns).data["token"]).decode()
    ca = base64.b64encode(Path(cluster.ca).read_bytes()).decode()
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "operator"}}],
    }))
    return path


def test_operator_runs_a_distillation_with_the_shipped_cluster_role(
    cluster: Cluster, k8s_api: Any, namespace: str, node_factory: Callable[..., ProcessKubelet], tmp_path: Path
) -> None:
    install_crds(cluster)
    api, ns = Api(k8s_api), namespace
    stages = FakeStages(tmp_path / "fake")
    node_factory("rbac-node", gpus=0, labels={"pool": "rbac"}, extra_env=stages.env())
    client.CoreV1Api(k8s_api).patch_node("rbac-node", {"spec": {"taints": [
        {"key": "pool", "value": "rbac", "effect": "NoSchedule"}]}})
    role = f"bm-operator-{ns}"[:63]
    kubeconfig = service_account_kubeconfig(cluster, k8s_api, ns, role, tmp_path / "kubeconfig")
    here = {"nodeSelector": {"pool": "rbac"}, "tolerations": [{"key": "pool", "operator": "Exists"}]}
    live = free_port()
    op = OperatorProcess(cluster, tmp_path / "operator.log", kubeconfig=kubeconfig,
                         extra_args=("--liveness", f"http://127.0.0.1:{live}/healthz")).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=10) as r:  # kopf's liveness probe
        assert r.status == 200 and "reconciles_pending" in r.read().decode()
    try:
        apply(cluster, ns, {
            "apiVersion": "branchmerge.io/v1alpha1", "kind": "Distillation", "metadata": {"name": "rbac"},
            "spec": {
                "student": {"uri": "s3://fake/student"},
                "output": {"uri": "s3://fake/rbac", "credentialsSecret": "creds"},
                "branches": [{"name": b, "datasets": [{"uri": f"s3://fake/{b}.jsonl"}],
                              "training": {"globalBatchSize": 1}, "resources": {"gpusPerNode": 0, **here}}
                             for b in ("math", "code")],
                "merge": {"resources": here},
                "eval": {"benchmarks": [{"name": "arith", "kind": "math", "uri": "s3://fake/b.jsonl"}],
                         "resources": here},
            },
        })
        # The operator never reads the Secret: only the (fake) kubelet does, for the pods.
        client.CoreV1Api(k8s_api).create_namespaced_secret(ns, {
            "metadata": {"name": "creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}})
        debug = lambda: describe(api, ns) + "\n--- operator ---\n" + op.tail(40)  # noqa: E731
        wait_for("Succeeded", lambda: api.phase("distillations", ns, "rbac") == "Succeeded", 120, debug=debug)
        st = api.get("distillations", ns, "rbac")["status"]
        assert st["evaluation"]["results"] and st["branchesSucceeded"] == "2/2"
        wait_events(api, ns, "rbac", "Succeeded")
        api.delete("distillations", ns, "rbac")  # children go by garbage collection
        wait_for("deleted with its children", lambda: api.get("distillations", ns, "rbac") is None
                 and not api.list("branchjobs", ns), 60, debug=debug)
        assert "403" not in op.log() and "Forbidden" not in op.log(), op.tail(80)
    finally:
        op.stop()
        rbac = client.RbacAuthorizationV1Api(k8s_api)
        rbac.delete_cluster_role_binding(role)
        rbac.delete_cluster_role(role)


def test_namespaced_mode_with_the_namespaced_role_reconciles_at_once(
    cluster: Cluster, k8s_api: Any, namespace: str, tmp_path: Path
) -> None:
    """`branchmerge operator -n NS` as a ServiceAccount bound to the shipped namespaced Role
    (manifests/rbac/namespaced: no ClusterRole, so kopf may not list namespaces or CRDs).
    kopf's cluster scanning is off for named namespaces; with it on, kopf retried the 403s for
    ~54 s before falling back, and the first reconcile came a minute late."""
    import os
    import subprocess
    import time

    from tests.operator_kit import VENV_BIN

    install_crds(cluster)
    api, ns = Api(k8s_api), namespace
    core = client.CoreV1Api(k8s_api)
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "branchmerge-operator"}})
    role = yaml.safe_load((REPO / "manifests/rbac/namespaced/role.yaml").read_text())
    binding = yaml.safe_load((REPO / "manifests/rbac/namespaced/rolebinding.yaml").read_text())
    binding["subjects"][0]["namespace"] = ns
    rbac.create_namespaced_role(ns, role)
    rbac.create_namespaced_role_binding(ns, binding)
    secret_name = wait_for("ServiceAccount token", lambda: (
        (sa := core.read_namespaced_service_account("branchmerge-operator", ns)).secrets and sa.secrets[0].name), 30)
    token = base64.b64decode(core.read_namespaced_secret(secret_name, ns).data["token"]).decode()
    ca = base64.b64encode(Path(cluster.ca).read_bytes()).decode()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "operator"}}],
    }))  # fmt: skip
    apply(cluster, ns, {
        "apiVersion": "branchmerge.io/v1alpha1", "kind": "Distillation", "metadata": {"name": "nsmode"},
        "spec": {"student": {"uri": "s3://fake/student"}, "output": {"uri": "s3://fake/nsmode"},
                 "branches": [{"name": b, "datasets": [{"uri": f"s3://fake/{b}.jsonl"}],
                               "resources": {"gpusPerNode": 0}} for b in ("math", "code")]},
    })  # fmt: skip
    log = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "branchmerge"), "operator", "-n", ns, "--log-format", "plain",
                                 "--metrics-port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    started = time.monotonic()
    try:
        wait_for("the first status", lambda: api.phase("distillations", ns, "nsmode") is not None, 40,
                 debug=lambda: log.read_text()[-3000:])  # fmt: skip
        assert time.monotonic() - started < 40
        wait_for("its BranchJob", lambda: api.get("branchjobs", ns, "nsmode-math") is not None, 20)
        text = log.read_text()
        assert "Forbidden" not in text and "403" not in text, text[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

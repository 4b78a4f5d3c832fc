"""Install the operator on the real test control plane, every way a user would, and prove its
ServiceAccount can do what the operator needs and nothing broader.

* every `helm template` of the values matrix passes `kubectl apply --dry-run=server`;
* the kustomize overlays (cluster-wide, namespaced) are applied for real, their Deployment's
  pod is admitted and scheduled, and `kubectl auth can-i --as=system:serviceaccount:…`
  answers yes for each verb in the RBAC table and no for broader ones (wildcards, secrets,
  deleting Distillations, cluster-scoped writes, other namespaces in namespaced mode);
* `helm install` of the chart in both scopes, with the same checks on its ServiceAccount;
* the real operator (`branchmerge operator` with the Deployment's own arguments, as a local
  process holding the installed ServiceAccount's token) reconciles a Distillation in both
  modes without one forbidden request: the table above is not only minimal but sufficient.

The Deployment's pod is admitted and scheduled but not run (the test kubelet knows no
entry point for the operator image); the operator runs as a process instead.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster
from tests.unit.test_chart import CHART, MATRIX, OVERLAYS, REPO, by_kind, kustomize, render_chart
from tests.unit.test_chart_rbac import CLUSTER_ONLY_RULES, NAMESPACED_RULES

pytestmark = pytest.mark.cluster

CRDS = REPO / "manifests" / "crds"

#: Stand-in for the Prometheus Operator's CRD, so ServiceMonitor renders can be applied.
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors", "singular": "servicemonitor"},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip

#: (verb, apiGroup, resource[/subresource]) the operator must never be allowed, in any mode.
NEVER_NAMESPACED = [
    ("get", "", "secrets"), ("list", "", "secrets"), ("watch", "", "secrets"), ("create", "", "secrets"),
    ("create", "branchmerge.io", "distillations"), ("delete", "branchmerge.io", "distillations"),
    ("deletecollection", "", "pods"), ("patch", "", "pods"), ("create", "", "pods/exec"), ("get", "", "pods/exec"),
    ("create", "", "serviceaccounts/token"), ("create", "", "configmaps"), ("create", "apps", "deployments"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"), ("create", "rbac.authorization.k8s.io", "roles"),
    ("impersonate", "", "serviceaccounts"), ("*", "*", "*"), ("*", "", "pods"), ("get", "", "*"),
]  # fmt: skip
NEVER_CLUSTER = [
    ("list", "", "secrets"), ("watch", "", "secrets"), ("get", "", "secrets"),
    ("create", "", "namespaces"), ("delete", "", "namespaces"), ("patch", "", "nodes"), ("list", "", "nodes"),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("patch", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("*", "*", "*"),
]  # fmt: skip

#: A question: (verb, apiGroup, resource[/subresource], namespace or None for cluster-wide, expected answer).
Question = tuple[str, str, str, str | None, bool]


def can_i(cluster: Cluster, sa: str, q: Question) -> bool:
    """`kubectl auth can-i` as the ServiceAccount (impersonated by the admin)."""
    verb, group, resource, namespace, _ = q
    name, _, sub = resource.partition("/")
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    extra = [f"--subresource={sub}"] if sub else []
    full = f"{name}.{group}" if group and name != "*" else name
    out = cluster.kubectl("auth", "can-i", verb, full, *extra, *scope, f"--as={sa}", check=False)
    answer = out.strip().splitlines()[-1] if out.strip() else ""
    assert answer in {"yes", "no"}, f"can-i {verb} {full} {extra}: {out!r}"
    return answer == "yes"


def access_review(api: Any, sa: str, q: Question) -> bool:
    """The same question as a SubjectAccessReview (what `can-i --as` asks, without a process each)."""
    from kubernetes import client

    verb, group, resource, namespace, _ = q
    name, _, sub = resource.partition("/")
    sa_ns = sa.split(":")[2]
    attributes = {
        "verb": verb,
        "group": group,
        "resource": name,
        "subresource": sub,
        "namespace": namespace or "",
    }
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": sa,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{sa_ns}",
                    "system:authenticated",
                ],
                "resourceAttributes": attributes,
            },
        }
    )
    return bool(review.status.allowed)


def check_access(cluster: Cluster, sa: str, questions: list[Question]) -> None:
    """Ask every question and report all wrong answers at once.

    Every question goes to the API server's authorizer as a SubjectAccessReview; a sample
    (a yes and a no of each shape: namespaced, cluster-wide, subresource) also goes through
    `kubectl auth can-i --as=…`, and both must agree. One kubectl process per question costs
    ~0.5 s on this machine, for a hundred questions per install.
    """
    with cluster.api_client() as api:
        answers = [access_review(api, sa, q) for q in questions]
    wrong = [
        f"{'should' if q[4] else 'must not'}: {q[0]} {q[2]} ({q[1] or 'core'}) in {q[3] or 'all namespaces'}"
        for q, got in zip(questions, answers, strict=True)
        if got != q[4]
    ]
    assert not wrong, f"{sa}:\n" + "\n".join(wrong)
    sample: dict[tuple[bool, bool, bool], Question] = {}
    for q in questions:
        sample.setdefault((q[4], q[3] is None, "/" in q[2]), q)
    with ThreadPoolExecutor(max_workers=4) as pool:
        kubectl_answers = list(pool.map(lambda q: can_i(cluster, sa, q), sample.values()))
    assert kubectl_answers == [q[4] for q in sample.values()], list(sample.values())


def needed(rules: dict[tuple[str, str], set[str]]) -> list[tuple[str, str, str]]:
    return [
        (verb, group, resource)
        for (group, resource), verbs in sorted(rules.items())
        for verb in sorted(verbs)
    ]


def access_table(watched: str, other: str | None, cluster_wide: bool) -> list[Question]:
    table: list[Question] = []
    table += [(v, g, r, watched, True) for v, g, r in needed(NAMESPACED_RULES)]
    table += [(v, g, r, None, cluster_wide) for v, g, r in needed(CLUSTER_ONLY_RULES)]
    table += [(v, g, r, watched, False) for v, g, r in NEVER_NAMESPACED]
    table += [(v, g, r, None, False) for v, g, r in NEVER_CLUSTER]
    if other is not None:
        # Cluster-wide mode reaches every namespace; namespaced mode none but its own.
        table += [(v, g, r, other, cluster_wide) for v, g, r in needed(NAMESPACED_RULES)]
    return table


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    """The generated CRDs (as docs/install.md says: server-side apply) + a ServiceMonitor stand-in."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=branchmerge-install", "-f", str(CRDS)
    )
    cluster.kubectl("apply", "-f", "-", input=json.dumps(SERVICEMONITOR_CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s",
        "crd/distillations.branchmerge.io", "crd/branchjobs.branchmerge.io", "crd/servicemonitors.monitoring.coreos.com",
    )  # fmt: skip


@pytest.fixture
def extra_namespaces(cluster: Cluster, namespace: str) -> Iterator[list[str]]:
    names = [f"{namespace}-a", f"{namespace}-b"]
    for n in names:
        cluster.kubectl("create", "namespace", n)
    try:
        yield names
    finally:
        for n in names:
            cluster.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found", check=False)


def overlay_in(tmp_path: Path, overlay: str, namespace: str, prefix: str) -> str:
    """kustomize output of `overlay`, moved to `namespace`, cluster-scoped names prefixed
    (the session cluster is shared); the way a user overlays our overlays."""
    rel = os.path.relpath(OVERLAYS / overlay, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"namespace": namespace, "namePrefix": prefix, "resources": [rel]})
    )
    return yaml.safe_dump_all(kustomize(tmp_path))


def wait_for_pod(cluster: Cluster, namespace: str, selector: str, timeout: float = 30) -> dict[str, Any]:
    """The Deployment's pod, once admitted and bound to a node (it is not expected to run)."""
    deadline = time.monotonic() + timeout
    while True:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))[
            "items"
        ]
        if pods and pods[0]["spec"].get("nodeName"):
            return dict(pods[0])
        if time.monotonic() > deadline:
            events = cluster.kubectl("get", "events", "-n", namespace, check=False)
            raise AssertionError(f"no scheduled pod for {selector} in {namespace}:\n{events}")
        time.sleep(0.3)


def check_installed_pod(pod: dict[str, Any], sa: str) -> None:
    spec = pod["spec"]
    assert spec["serviceAccountName"] == sa
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


# --------------------------------------------------------------------------- tests


def test_every_chart_render_passes_server_side_dry_run(
    cluster: Cluster, crds: None, namespace: str, extra_namespaces: list[str], tmp_path: Path
) -> None:
    for case, values in sorted(MATRIX.items()):
        values = json.loads(json.dumps(values))
        if values.get("watchNamespaces"):
            values["watchNamespaces"] = extra_namespaces[: len(values["watchNamespaces"])]
        objs = render_chart(values, tmp_path, "--include-crds", namespace=namespace)
        docs = yaml.safe_dump_all(objs)
        out = cluster.kubectl(
            "apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", "-", input=docs
        )
        assert out.count("(server dry run)") == len(objs), f"{case}:\n{out}"


@pytest.mark.parametrize("overlay", ["cluster-wide", "namespaced"])
def test_kustomize_install(
    overlay: str, cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    prefix = f"t{secrets.token_hex(3)}-"
    docs = overlay_in(tmp_path, overlay, namespace, prefix)
    dry = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=docs)
    assert "(server dry run)" in dry
    cluster.kubectl("apply", "-f", "-", input=docs)
    objs = [d for d in yaml.safe_load_all(docs) if d and d["kind"] != "Namespace"]
    try:
        sa = f"{prefix}branchmerge-operator"
        pod = wait_for_pod(
            cluster, namespace, "app.kubernetes.io/name=branchmerge,app.kubernetes.io/component=operator"
        )
        check_installed_pod(pod, sa)
        cluster_wide = overlay == "cluster-wide"
        assert bool(by_kind(objs, "ClusterRole")) == cluster_wide
        check_access(
            cluster,
            f"system:serviceaccount:{namespace}:{sa}",
            access_table(namespace, "default", cluster_wide),
        )
    finally:
        cluster.kubectl(
            "delete",
            "--wait=false",
            "--ignore-not-found",
            "-f",
            "-",
            input=yaml.safe_dump_all(objs),
            check=False,
        )


@pytest.mark.parametrize("cluster_wide", [True, False], ids=["cluster-wide", "namespaced"])
def test_helm_install(
    cluster_wide: bool, cluster: Cluster, crds: None, namespace: str, extra_namespaces: list[str]
) -> None:
    release = f"r{secrets.token_hex(3)}"
    args = [
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"clusterWide={str(cluster_wide).lower()}",
    ]
    if not cluster_wide:
        args += ["--set", f"watchNamespaces={{{namespace},{extra_namespaces[0]}}}"]
    out = cluster.helm(*args)
    assert "STATUS: deployed" in out and "s3-credentials-secret.yaml" in out
    try:
        sa = f"{release}-branchmerge"
        pod = wait_for_pod(cluster, namespace, f"app.kubernetes.io/instance={release}")
        check_installed_pod(pod, sa)
        table = access_table(namespace, extra_namespaces[1], cluster_wide)
        if not cluster_wide:  # the second watched namespace is as reachable as the first
            table += [(v, g, r, extra_namespaces[0], True) for v, g, r in needed(NAMESPACED_RULES)]
        check_access(cluster, f"system:serviceaccount:{namespace}:{sa}", table)
    finally:
        cluster.helm("uninstall", release, "-n", namespace, check=False)


#: kopf's discovery calls that namespaced mode's Role deliberately does not allow; kopf falls
#: back to the namespaces it was given ("Not enough permissions to list namespaces …").
KOPF_SCANNING = ('resource "namespaces" in API group "" at the cluster scope',
                 'resource "customresourcedefinitions" in API group "apiextensions.k8s.io" at the cluster scope')  # fmt: skip


def _wait(what: str, fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
    return value


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["cluster-wide", "namespaced"])
def test_operator_runs_under_the_installed_rbac(
    overlay: str, cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    """The real operator, with the Deployment's own arguments and the installed ServiceAccount's
    token, reconciles a Distillation (BranchJobs, gang pods, Services, events, status,
    finalizers) without a single forbidden request."""
    prefix = f"t{secrets.token_hex(3)}-"
    docs = overlay_in(tmp_path, overlay, namespace, prefix)
    cluster.kubectl("apply", "-f", "-", input=docs)
    sa = f"{prefix}branchmerge-operator"
    deployment = next(d for d in yaml.safe_load_all(docs) if d and d["kind"] == "Deployment")
    args = [
        a.replace("$(POD_NAMESPACE)", namespace)
        for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    args = [a for a in args if not a.startswith(("--liveness", "--metrics-port"))]  # no ports needed here
    log_path = tmp_path / "operator.log"
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(cluster.kubeconfig_for(namespace, sa))
    exe = Path(sys.executable).with_name("branchmerge")
    with log_path.open("w") as log:
        operator = subprocess.Popen(
            [str(exe), "operator", *args, "--metrics-port=0", "--log-format=plain"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    name = "rbac-probe"
    try:
        dist = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
        dist["metadata"] = {"name": name, "namespace": namespace}
        for branch in dist["spec"]["branches"]:  # keep the gang pods Pending: nothing runs them
            branch["resources"] = {
                **branch["resources"],
                "nodeSelector": {"branchmerge.io/no-such-node": "true"},
            }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(dist))

        def reconciled() -> bool:
            obj = json.loads(cluster.kubectl("get", "distillation", name, "-n", namespace, "-o", "json"))
            pods = json.loads(
                cluster.kubectl(
                    "get", "pods", "-n", namespace, "-l", f"branchmerge.io/distillation={name}", "-o", "json"
                )
            )
            return obj.get("status", {}).get("observedGeneration") == 1 and len(pods["items"]) == len(
                dist["spec"]["branches"]
            )

        _wait("the operator to create the gang pods and write status", reconciled, 120)
        cluster.kubectl("delete", "distillation", name, "-n", namespace, "--wait=false")
        _wait(
            "the operator to release its finalizers",
            lambda: (
                not cluster.kubectl("get", "distillations,branchjobs", "-n", namespace, "-o", "name").strip()
            ),
            60,
        )
    finally:
        operator.terminate()
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()
        cluster.kubectl("delete", "--wait=false", "--ignore-not-found", "-f", "-",
                        input=yaml.safe_dump_all([d for d in yaml.safe_load_all(docs) if d and d["kind"] != "Namespace"]), check=False)  # fmt: skip
    log_text = log_path.read_text()
    forbidden = [line for line in log_text.splitlines() if "Forbidden" in line or "forbidden" in line]
    if overlay == "namespaced":
        forbidden = [line for line in forbidden if not any(s in line for s in KOPF_SCANNING)]
    assert not forbidden, "\n".join(forbidden[:10])
    assert "Created BranchJob" in log_text

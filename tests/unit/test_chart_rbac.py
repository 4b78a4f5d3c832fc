"""The operator's RBAC, one table: the Helm chart and the kustomize manifests must grant
exactly these rules, in both install modes, and nothing broader.

tests/integration/test_install.py asks the real API server the same questions with
`kubectl auth can-i --as=system:serviceaccount:…`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_chart import by_kind, kustomize, render_chart

Rule = tuple[str, str]  # (apiGroup, resource)

#: What the operator needs in every namespace it watches (docs/operations.md lists why).
NAMESPACED_RULES: dict[Rule, set[str]] = {
    ("branchmerge.io", "distillations"): {"get", "list", "watch"},
    ("branchmerge.io", "branchjobs"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("branchmerge.io", "distillations/status"): {"get", "patch", "update"},
    ("branchmerge.io", "branchjobs/status"): {"get", "patch", "update"},
    ("branchmerge.io", "distillations/finalizers"): {"update"},
    ("branchmerge.io", "branchjobs/finalizers"): {"update"},
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "list", "watch", "create", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
#: Cluster-wide mode only: kopf notices CRDs and namespaces.
CLUSTER_ONLY_RULES: dict[Rule, set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
CLUSTER_RULES = {**NAMESPACED_RULES, **CLUSTER_ONLY_RULES}

#: Verbs that would let the operator widen its own rights.
ESCALATING_VERBS = {"*", "escalate", "bind", "impersonate", "deletecollection"}


def expand(rules: list[dict[str, Any]]) -> dict[Rule, set[str]]:
    out: dict[Rule, set[str]] = {}
    for rule in rules:
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def check_least_privilege(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
        assert not ESCALATING_VERBS & set(rule["verbs"]), rule
        assert not {"secrets", "configmaps", "serviceaccounts", "serviceaccounts/token"} & set(
            rule["resources"]
        ), rule
        assert not {"rbac.authorization.k8s.io", "admissionregistration.k8s.io"} & set(rule["apiGroups"]), (
            rule
        )


def rendered_rbac(objs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return by_kind(objs, "ClusterRole"), by_kind(objs, "Role")


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp: Path = tmp_path_factory.mktemp("rbac")
    return {
        "chart-cluster-wide": render_chart({}, tmp),
        "chart-namespaced": render_chart(
            {"clusterWide": False, "watchNamespaces": ["team-a", "team-b"]}, tmp
        ),
        "kustomize-cluster-wide": kustomize("cluster-wide"),
        "kustomize-namespaced": kustomize("namespaced"),
    }


@pytest.mark.parametrize("source", ["chart-cluster-wide", "kustomize-cluster-wide"])
def test_cluster_wide_grants_exactly_the_table(source: str, renders: dict[str, list[dict[str, Any]]]) -> None:
    cluster_roles, roles = rendered_rbac(renders[source])
    assert len(cluster_roles) == 1 and not roles
    check_least_privilege(cluster_roles[0]["rules"])
    assert expand(cluster_roles[0]["rules"]) == CLUSTER_RULES
    (binding,) = by_kind(renders[source], "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_roles[0]["metadata"]["name"]


@pytest.mark.parametrize("source", ["chart-namespaced", "kustomize-namespaced"])
def test_namespaced_grants_exactly_the_table_with_roles_only(
    source: str, renders: dict[str, list[dict[str, Any]]]
) -> None:
    cluster_roles, roles = rendered_rbac(renders[source])
    assert not cluster_roles and not by_kind(renders[source], "ClusterRoleBinding")
    assert roles
    for role in roles:
        check_least_privilege(role["rules"])
        assert expand(role["rules"]) == NAMESPACED_RULES


def test_the_table_itself_is_least_privilege() -> None:
    rules = [{"apiGroups": [g], "resources": [r], "verbs": sorted(v)} for (g, r), v in CLUSTER_RULES.items()]
    check_least_privilege(rules)
    # Cluster-scoped objects: read-only, and only what kopf needs to discover resources.
    for (group, resource), verbs in CLUSTER_ONLY_RULES.items():
        assert verbs <= {"get", "list", "watch"}, (group, resource)


def test_the_manifest_files_say_the_same_as_the_chart(renders: dict[str, list[dict[str, Any]]]) -> None:
    chart = expand(by_kind(renders["chart-cluster-wide"], "ClusterRole")[0]["rules"])
    kust = expand(by_kind(renders["kustomize-cluster-wide"], "ClusterRole")[0]["rules"])
    assert chart == kust

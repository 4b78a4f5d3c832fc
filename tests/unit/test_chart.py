"""The Helm chart: `helm lint` and `helm template` over a matrix of values, and what the
rendered objects must look like in every combination.

Uses the helm and kubectl binaries that tests/cluster/build.sh caches (helm v4, kubectl
v1.35); no cluster is needed. tests/integration/test_install.py applies the same renders to
the real control plane.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import HarnessNotBuilt, helm_path, kubectl_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "branchmerge"
OVERLAYS = REPO / "manifests" / "kustomize" / "overlays"
RELEASE = "bm"
RELEASE_NS = "branchmerge-system"

#: id -> values; every combination is linted, rendered and checked.
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-release-ns": {"clusterWide": False},
    "namespaced-two-ns": {"clusterWide": False, "watchNamespaces": ["team-a", "team-b"]},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "metrics-off": {"metrics": {"enabled": False}},
    "namespaced-servicemonitor": {
        "clusterWide": False,
        "watchNamespaces": ["team-a"],
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "everything-set": {
        "image": {"repository": "registry.example.com/bm/operator", "digest": "sha256:" + "a" * 64},
        "trainer": {"image": {"repository": "registry.example.com/bm/trainer", "tag": "0.1.0-vllm"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "debug",
        "logFormat": "plain",
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "system-cluster-critical",
        "podLabels": {"team": "ml"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "serviceAccount": {"annotations": {"example.com/role": "operator"}},
        "fullnameOverride": "distill",
    },
    "external-rbac-and-sa": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "ops-sa"},
    },
}

#: Values the chart must refuse, and a fragment of the reason.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "watch-list-with-cluster-wide": ({"watchNamespaces": ["a"]}, "watchNamespaces"),
    "servicemonitor-without-metrics": (
        {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
        "metrics",
    ),
    "unknown-key": ({"replicas": 2}, "replicas"),
    "bad-log-level": ({"logLevel": "loud"}, "logLevel"),
    "bad-log-format": ({"logFormat": "xml"}, "logFormat"),
    "bad-namespace-name": ({"clusterWide": False, "watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    "bad-digest": ({"image": {"digest": "latest"}}, "digest"),
    "external-sa-without-name": ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
}


def tool(name: str) -> Path:
    try:
        return helm_path() if name == "helm" else kubectl_path()
    except HarnessNotBuilt as e:
        pytest.fail(str(e), pytrace=False)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stderr}{res.stdout}"
    return res


def write_values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(json.dumps(values))
    return path


def render_chart(
    values: dict[str, Any], tmp_path: Path, *extra: str, namespace: str = RELEASE_NS
) -> list[dict[str, Any]]:
    """`helm template` with these values -> the objects (CRDs not included unless asked)."""
    vfile = write_values(tmp_path, values)
    out = helm("template", RELEASE, str(CHART), "-n", namespace, "-f", str(vfile), *extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kustomize(overlay: str | Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one of our overlays (by name) or of any directory."""
    path = overlay if isinstance(overlay, Path) else OVERLAYS / overlay
    res = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def check_operator_deployment(dep: dict[str, Any]) -> dict[str, Any]:
    """What every install's operator Deployment must be; returns its container."""
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]} and not csc.get("privileged")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_lint_and_template(case: str, tmp_path: Path) -> None:
    values = MATRIX[case]
    vfile = write_values(tmp_path, values)
    lint = helm("lint", "--strict", str(CHART), "-n", RELEASE_NS, "-f", str(vfile))
    assert "0 chart(s) failed" in lint.stdout

    objs = render_chart(values, tmp_path)
    cluster_wide = values.get("clusterWide", True)
    watch = values.get("watchNamespaces") or [RELEASE_NS]
    metrics = values.get("metrics", {}).get("enabled", True)
    monitor = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    rbac = values.get("rbac", {}).get("create", True)
    sa_create = values.get("serviceAccount", {}).get("create", True)

    for o in objs:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "branchmerge", o["kind"]
        if o["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert o["metadata"]["namespace"], o["kind"]
    assert not by_kind(objs, "Namespace"), (
        "the release namespace belongs to `helm install --create-namespace`"
    )
    assert not by_kind(objs, "Secret"), "the chart never carries credentials"

    dep = one(objs, "Deployment")
    container = check_operator_deployment(dep)
    pod = dep["spec"]["template"]["spec"]
    args = container["args"]
    if cluster_wide:
        assert "--all-namespaces" in args and not [a for a in args if a.startswith("--namespace")]
    else:
        assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in watch]
        assert "--all-namespaces" not in args
    env = env_of(container)
    # The flags of `branchmerge operator` (operator_main.py).
    assert f"--metrics-port={8080 if metrics else 0}" in args
    assert f"--log-format={values.get('logFormat', 'json')}" in args
    assert ("--verbose" in args) == (values.get("logLevel") == "debug")
    assert env["BRANCHMERGE_TRAINER_IMAGE"].startswith(
        values.get("trainer", {}).get("image", {}).get("repository", "ghcr.io/branchmerge/trainer") + ":"
    )
    for extra in values.get("extraEnv", []):
        assert env[extra["name"]] == extra["value"]
    ports = {p["name"] for p in container["ports"]}
    assert ports == ({"metrics", "health"} if metrics else {"health"})
    image = values.get("image", {})
    if image.get("digest"):
        assert container["image"] == f"{image['repository']}@{image['digest']}"
    else:
        assert container["image"] == "ghcr.io/branchmerge/operator:0.1.0"
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        if key in values:
            assert pod[key] == values[key], key
        else:
            assert key not in pod, key

    sa_name = pod["serviceAccountName"]
    if sa_create:
        sa = one(objs, "ServiceAccount")
        assert sa["metadata"]["name"] == sa_name and sa["automountServiceAccountToken"] is False
    else:
        assert not by_kind(objs, "ServiceAccount") and sa_name == values["serviceAccount"]["name"]

    cluster_rbac = by_kind(objs, "ClusterRole") + by_kind(objs, "ClusterRoleBinding")
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    if not rbac:
        assert not cluster_rbac and not roles and not bindings
    elif cluster_wide:
        assert len(cluster_rbac) == 2 and not roles and not bindings
        (crb,) = by_kind(objs, "ClusterRoleBinding")
        assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": RELEASE_NS}]
    else:
        assert not cluster_rbac, "namespaced mode must not need any cluster-scoped RBAC"
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watch)
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watch)
        for b in bindings:
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": RELEASE_NS}]
            assert b["roleRef"]["kind"] == "Role"

    services = by_kind(objs, "Service")
    monitors = by_kind(objs, "ServiceMonitor")
    assert len(services) == (1 if metrics else 0)
    assert len(monitors) == (1 if monitor else 0)
    if services:
        assert (
            services[0]["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
    if monitors:
        sm = monitors[0]
        assert (
            sm["spec"]["endpoints"][0]["port"] == "metrics"
            and sm["spec"]["endpoints"][0]["path"] == "/metrics"
        )
        assert sm["spec"]["selector"]["matchLabels"].items() <= services[0]["metadata"]["labels"].items()
        for k, v in values["metrics"]["serviceMonitor"].get("labels", {}).items():
            assert sm["metadata"]["labels"][k] == v


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_values_are_refused(case: str, tmp_path: Path) -> None:
    values, fragment = INVALID[case]
    res = helm("template", RELEASE, str(CHART), "-f", str(write_values(tmp_path, values)), check=False)
    assert res.returncode != 0, f"{case} rendered:\n{res.stdout[:500]}"
    assert fragment in res.stderr, res.stderr


def test_notes_say_what_to_apply_next(tmp_path: Path) -> None:
    for values in ({}, {"clusterWide": False, "watchNamespaces": ["team-a"]}):
        res = helm(
            "install",
            RELEASE,
            str(CHART),
            "-n",
            RELEASE_NS,
            "--dry-run=client",
            "-f",
            str(write_values(tmp_path, values)),
        )
        notes = res.stdout.split("NOTES:", 1)[1]
        assert "s3-credentials-secret.yaml" in notes and "kubectl -n <namespace> apply -f" in notes
        assert "kubectl apply --server-side -f charts/branchmerge/crds/" in notes
        assert ("every namespace" in notes) == (values == {})


def test_chart_crds_are_the_generated_ones(tmp_path: Path) -> None:
    # `branchmerge crds` writes both directories; the chart must ship exactly what
    # manifests/crds has, and helm must see them.
    chart_crds = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart_crds == sorted(p.name for p in (REPO / "manifests" / "crds").glob("*.yaml"))
    assert chart_crds, "charts/branchmerge/crds is empty: run `branchmerge crds`"
    for name in chart_crds:
        assert (CHART / "crds" / name).read_text() == (REPO / "manifests" / "crds" / name).read_text(), name
    objs = render_chart({}, tmp_path, "--include-crds")
    names = {o["metadata"]["name"] for o in by_kind(objs, "CustomResourceDefinition")}
    assert names == {"distillations.branchmerge.io", "branchjobs.branchmerge.io"}


def test_values_schema_is_valid_json_and_covers_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_kustomize_overlays_render_the_same_operator(tmp_path: Path) -> None:
    chart_dep = one(render_chart({}, tmp_path), "Deployment")
    chart_container = chart_dep["spec"]["template"]["spec"]["containers"][0]
    for overlay, scope_arg in (
        ("cluster-wide", "--all-namespaces"),
        ("namespaced", "--namespace=$(POD_NAMESPACE)"),
    ):
        objs = kustomize(overlay)
        for o in objs:
            if o["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
                assert o["metadata"]["namespace"] == RELEASE_NS, o["kind"]
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "branchmerge", o["kind"]
        assert one(objs, "Namespace")["metadata"]["name"] == RELEASE_NS
        dep = one(objs, "Deployment")
        container = check_operator_deployment(dep)
        assert container["args"][-1] == scope_arg
        assert (
            container["args"][:-1]
            == [a for a in chart_container["args"] if not a.startswith("--all-namespaces")][:2]
        )
        assert set(env_of(container)) == set(env_of(chart_container))
        # One operator, two packagings: the pod-level settings must not drift apart.
        for key in (
            "securityContext",
            "livenessProbe",
            "readinessProbe",
            "ports",
            "resources",
            "volumeMounts",
        ):
            assert container[key] == chart_container[key], key
        pod, chart_pod = dep["spec"]["template"]["spec"], chart_dep["spec"]["template"]["spec"]
        for key in (
            "securityContext",
            "volumes",
            "automountServiceAccountToken",
            "terminationGracePeriodSeconds",
        ):
            assert pod[key] == chart_pod[key], key
        one(objs, "Service")
        assert one(objs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_s3_secret_template_holds_placeholders_only() -> None:
    secret = yaml.safe_load((REPO / "examples" / "s3-credentials-secret.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for value in secret["stringData"].values():
        assert value.startswith("<") and value.endswith(">"), "a template must never carry a real key"
    # The name the TinyR1 example refers to.
    example = yaml.safe_load((REPO / "examples" / "tinyr1-32b.yaml").read_text())
    assert example["spec"]["output"]["credentialsSecret"] == secret["metadata"]["name"]


def test_operator_cli_accepts_the_rendered_args(tmp_path: Path) -> None:
    """Every Deployment we ship passes arguments `branchmerge operator` understands."""
    from branchmerge_operator import cli

    parser = cli.build_parser()
    if "operator" not in cli.COMMANDS:
        pytest.skip("`branchmerge operator` is not registered in this checkout yet")
    renders = {f"chart-{case}": render_chart(values, tmp_path) for case, values in MATRIX.items()}
    renders |= {f"kustomize-{o}": kustomize(o) for o in ("cluster-wide", "namespaced")}
    for name, objs in renders.items():
        container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        args = [a.replace("$(POD_NAMESPACE)", RELEASE_NS) for a in container["args"]]
        try:
            parsed = parser.parse_args(["operator", *args])
        except SystemExit as e:
            raise AssertionError(f"{name}: `branchmerge operator {' '.join(args)}` exits {e.code}") from e
        assert parsed.liveness == "http://0.0.0.0:8081/healthz", name
        assert bool(parsed.namespace) != bool(parsed.all_namespaces), name

"""Self-tests of the test harness: prove the control plane, the process kubelet and S3 are real.

If these pass, an operator test that relies on schema validation, the status subresource,
Jobs -> Pods -> scheduler -> kubelet -> completion, garbage collection, scheduling limits or
S3 credentials is testing the real behaviour, not a mock's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster import Cluster, S3Credentials, S3Server
from tests.cluster.controlplane import HarnessNotBuilt, require_binaries
from tests.cluster.controlplane import tools_dir as cluster_tools
from tests.cluster.podspec import PathMap, expand
from tests.cluster.procs import is_running

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def wait(
    what: str, fn: Callable[[], T | None], timeout: float = 60, debug: Callable[[], str] | None = None
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}" + (f"\n{debug()}" if debug else "")
            )
        time.sleep(0.2)


def pod_of_job(core: client.CoreV1Api, ns: str, job: str) -> Any:
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items
    return pods[0] if pods else None


def job_manifest(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "python:3.11-slim", "command": command, **container}
                    ],
                }
            },
        },
    }


def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "busybox", "command": command, **spec.pop("container", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }


# --------------------------------------------------------------------------- pure helpers


def test_path_map_rewrites_only_at_path_boundaries() -> None:
    m = PathMap.of({"/work": "/tmp/p/w", "/work/data": "/tmp/p/d", "/dev/termination-log": "/tmp/p/t"})
    assert m.rewrite("/work") == "/tmp/p/w"
    assert m.rewrite("/work/out/x.json") == "/tmp/p/w/out/x.json"
    assert m.rewrite("/work/data/a") == "/tmp/p/d/a"  # the longest mount wins
    assert m.rewrite("--out=/work/o,/work/p") == "--out=/tmp/p/w/o,/tmp/p/w/p"
    assert m.rewrite("file:///work/o") == "file:///tmp/p/w/o"
    assert m.rewrite('{"resultPath": "/dev/termination-log"}') == '{"resultPath": "/tmp/p/t"}'
    assert m.rewrite("echo hi > /dev/termination-log") == "echo hi > /tmp/p/t"
    for untouched in ("/workspace", "s3://bucket/work/x", "/home/work", "http://h:1/work", "/work.txt"):
        assert m.rewrite(untouched) == untouched


def test_env_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A) $$", env) == "$(A) $"


def test_missing_binaries_fail_with_build_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRANCHMERGE_K8S_BIN", str(tmp_path))
    with pytest.raises(HarnessNotBuilt, match=r"tests/cluster/build\.sh"):
        require_binaries()


# --------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_enforces_credentials(s3: S3Server, s3_bucket: str) -> None:
    s3.client().put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert s3.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"

    wrong_secret = S3Credentials(s3.access_key, "not-the-secret")
    with pytest.raises(ClientError) as e:
        s3.client(wrong_secret).get_object(Bucket=s3_bucket, Key="k")
    assert e.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")

    unknown_key = S3Credentials("AKNOSUCHKEY000000000", "x" * 40)
    with pytest.raises(ClientError) as e:
        s3.client(unknown_key).list_objects_v2(Bucket=s3_bucket)
    assert e.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")

    other_user = s3.create_user()  # valid credentials, but not the bucket's owner
    with pytest.raises(ClientError) as e:
        s3.client(other_user).get_object(Bucket=s3_bucket, Key="k")
    assert e.value.response["Error"]["Code"] == "AccessDenied"


def test_moto_server_serves_s3(moto_s3: S3Server) -> None:
    bucket = moto_s3.create_bucket()
    moto_s3.client().put_object(Bucket=bucket, Key="a/b", Body=b"data")
    assert moto_s3.client().get_object(Bucket=bucket, Key="a/b")["Body"].read() == b"data"


# --------------------------------------------------------------------------- API server semantics


@pytest.fixture(scope="module")
def widget_crd(k8s_api: Any) -> Iterator[tuple[str, str]]:
    """A namespaced CRD with a schema and the status subresource; yields (group, plural)."""
    ext = client.ApiextensionsV1Api(k8s_api)
    group = f"g{uuid.uuid4().hex[:6]}.test.branchmerge.io"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["replicas"],
                "properties": {"replicas": {"type": "integer", "minimum": 1}, "image": {"type": "string"}},
            },
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        },
    }
    ext.create_custom_resource_definition(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"widgets.{group}"},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": schema},
                        "subresources": {"status": {}},
                    }
                ],
            },
        }
    )

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"widgets.{group}")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait("CRD Established", established, 30)
    yield group, "widgets"
    ext.delete_custom_resource_definition(f"widgets.{group}")


@pytest.mark.cluster
def test_crd_schema_rejects_invalid_object(k8s_api: Any, namespace: str, widget_crd: tuple[str, str]) -> None:
    group, plural = widget_crd
    co = client.CustomObjectsApi(k8s_api)

    def widget(spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec}

    for bad in ({"replicas": 0}, {"replicas": "three"}, {"image": "x"}):
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(group, "v1", namespace, plural, widget(bad))
        assert e.value.status == 422, e.value.body
    created = co.create_namespaced_custom_object(group, "v1", namespace, plural, widget({"replicas": 2}))
    assert created["spec"]["replicas"] == 2


@pytest.mark.cluster
def test_status_subresource_ignores_status_on_main_resource(
    k8s_api: Any, namespace: str, widget_crd: tuple[str, str]
) -> None:
    group, plural = widget_crd
    co = client.CustomObjectsApi(k8s_api)
    body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "s"}, "spec": {"replicas": 1}}
    obj = co.create_namespaced_custom_object(
        group, "v1", namespace, plural, {**body, "status": {"phase": "Sneaky"}}
    )
    assert "status" not in obj or not obj["status"]
    gen = obj["metadata"]["generation"]

    patched = co.patch_namespaced_custom_object(
        group, "v1", namespace, plural, "s", {"status": {"phase": "Ignored"}}
    )
    assert (patched.get("status") or {}).get("phase") is None
    assert patched["metadata"]["generation"] == gen

    patched = co.patch_namespaced_custom_object_status(
        group, "v1", namespace, plural, "s", {"status": {"phase": "Ready"}}
    )
    assert patched["status"]["phase"] == "Ready"
    assert patched["metadata"]["generation"] == gen  # status writes do not bump generation

    patched = co.patch_namespaced_custom_object(
        group, "v1", namespace, plural, "s", {"spec": {"replicas": 3}}
    )
    assert patched["metadata"]["generation"] == gen + 1
    assert patched["status"]["phase"] == "Ready"  # a spec write does not touch status


# --------------------------------------------------------------------------- Jobs, pods and the process kubelet

RESULT_SCRIPT = """
import json, os, pathlib, sys
pathlib.Path(os.environ["OUT"], "marker").write_text("ok")
result = {k: os.environ.get(k) for k in ("FROM_SECRET", "FROM_CM", "POD", "NS", "LABEL", "ANN", "PFX_KEY", "COMBINED")}
result["cwd_is_local"] = not os.getcwd().startswith("/work")
result["argv"] = sys.argv[1:]
pathlib.Path("/dev/termination-log").write_text(json.dumps(result))
"""


@pytest.mark.cluster
def test_job_pod_runs_and_completes_with_termination_message(
    cluster: Cluster, k8s_api: Any, namespace: str
) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}}
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"mode": "fast", "KEY": "k"}}
    )
    job = job_manifest(
        "hello",
        ["python", "-c", RESULT_SCRIPT],
        args=["--out=/work/out", "$(POD)"],
        env=[
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}},
            {"name": "ANN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
            {"name": "OUT", "value": "/work"},
            {"name": "COMBINED", "value": "$(FROM_CM)-$(NS)"},
        ],
        envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "PFX_"}],
        volumeMounts=[{"name": "work", "mountPath": "/work"}],
    )
    job["spec"]["template"]["metadata"] = {"annotations": {"note": "hi"}}
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    batch.create_namespaced_job(namespace, job)

    def complete() -> Any:
        j = batch.read_namespaced_job("hello", namespace)
        return (
            j if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or []) else None
        )

    wait("Job Complete", complete, 60, lambda: cluster.dump(namespace))
    pod = pod_of_job(core, namespace, "hello")
    assert pod.spec.node_name == "node-1"  # bound by the real scheduler
    assert pod.status.phase == "Succeeded"
    assert pod.status.pod_ip == "127.0.0.1" and pod.status.start_time is not None
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (0, "Completed")
    assert term.finished_at is not None
    result = json.loads(term.message)
    assert result["FROM_SECRET"] == "s3cr3t" and result["FROM_CM"] == "fast"
    assert result["POD"] == pod.metadata.name and result["NS"] == namespace
    assert (result["LABEL"], result["ANN"], result["PFX_KEY"]) == ("hello", "hi", "k")
    assert result["COMBINED"] == f"fast-{namespace}"
    assert result["cwd_is_local"] is True
    pod_dir = cluster.kubelet.pod_dir(namespace, pod.metadata.name)
    assert result["argv"] == [f"--out={pod_dir}/volumes/work/out", pod.metadata.name]
    assert (pod_dir / "volumes" / "work" / "marker").read_text() == "ok"  # the emptyDir is a real directory


@pytest.mark.cluster
def test_deleting_job_garbage_collects_its_pod(k8s_api: Any, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(namespace, job_manifest("gc", ["sh", "-c", "exit 0"]))
    wait("Job succeeded", lambda: batch.read_namespaced_job("gc", namespace).status.succeeded, 60)
    assert pod_of_job(core, namespace, "gc") is not None
    batch.delete_namespaced_job("gc", namespace, propagation_policy="Background")
    wait("pod garbage-collected", lambda: pod_of_job(core, namespace, "gc") is None, 60)


@pytest.mark.cluster
def test_failing_command_gives_failed_pod_with_exit_code(k8s_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace,
        pod_manifest(
            "boom",
            ["sh", "-c", "echo last words; exit 3"],
            container={"terminationMessagePolicy": "FallbackToLogsOnError"},
        ),
    )
    pod = wait(
        "pod Failed",
        lambda: p if (p := core.read_namespaced_pod("boom", namespace)).status.phase == "Failed" else None,
        60,
    )
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error")
    assert "last words" in term.message


@pytest.mark.cluster
def test_gpu_request_beyond_node_capacity_stays_pending(k8s_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    gpus = {"limits": {"nvidia.com/gpu": "9"}}  # node-1 has 8
    core.create_namespaced_pod(namespace, pod_manifest("greedy", ["true"], container={"resources": gpus}))

    def failed_scheduling() -> Any:
        evs = core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy").items
        return next((e for e in evs if e.reason == "FailedScheduling"), None)

    ev = wait("FailedScheduling event", failed_scheduling, 30)
    assert "nvidia.com/gpu" in ev.message
    pod = core.read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name

    fits = {"limits": {"nvidia.com/gpu": "8"}}
    core.create_namespaced_pod(namespace, pod_manifest("fits", ["true"], container={"resources": fits}))
    wait(
        "8-GPU pod Succeeded",
        lambda: core.read_namespaced_pod("fits", namespace).status.phase == "Succeeded",
        30,
    )


@pytest.mark.cluster
def test_pod_deletion_sends_sigterm_then_removes_pod(cluster: Cluster, k8s_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    script = "trap 'echo got-term > /work/term; exit 0' TERM; while true; do sleep 0.1; done"
    pod = pod_manifest(
        "sleeper",
        ["sh", "-c", script],
        container={"volumeMounts": [{"name": "w", "mountPath": "/work"}]},
        volumes=[{"name": "w", "emptyDir": {}}],
    )
    core.create_namespaced_pod(namespace, pod)
    wait("Running", lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running", 30)
    pod_dir = cluster.kubelet.pod_dir(namespace, "sleeper")
    core.delete_namespaced_pod("sleeper", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait("pod removed by the kubelet", gone, 30)
    assert (pod_dir / "volumes" / "w" / "term").read_text().strip() == "got-term"


@pytest.mark.cluster
def test_eviction_marks_pod_failed_evicted(cluster: Cluster, k8s_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(namespace, pod_manifest("victim", ["sleep", "300"]))
    wait("Running", lambda: core.read_namespaced_pod("victim", namespace).status.phase == "Running", 30)
    cluster.kubelet.evict(namespace, "victim")
    pod = wait(
        "Evicted",
        lambda: p if (p := core.read_namespaced_pod("victim", namespace)).status.phase == "Failed" else None,
        30,
    )
    assert pod.status.reason == "Evicted"
    assert any(c.type == "DisruptionTarget" and c.status == "True" for c in pod.status.conditions)


@pytest.mark.cluster
def test_node_failure_fails_its_pods(k8s_api: Any, namespace: str, node_factory: Callable[..., Any]) -> None:
    core = client.CoreV1Api(k8s_api)
    node = node_factory("node-flaky", gpus=0, labels={"flaky": "yes"})
    core.create_namespaced_pod(
        namespace, pod_manifest("onflaky", ["sleep", "300"], nodeSelector={"flaky": "yes"})
    )
    wait("Running", lambda: core.read_namespaced_pod("onflaky", namespace).status.phase == "Running", 30)
    node.fail_node()
    pod = core.read_namespaced_pod("onflaky", namespace)
    assert (pod.status.phase, pod.status.reason) == ("Failed", "NodeLost")
    n = core.read_node("node-flaky")
    assert {t.key for t in n.spec.taints} == {"node.kubernetes.io/unreachable"}
    assert next(c for c in n.status.conditions if c.type == "Ready").status == "Unknown"
    node.recover_node()
    assert (
        next(c for c in core.read_node("node-flaky").status.conditions if c.type == "Ready").status == "True"
    )


@pytest.mark.cluster
def test_cli_up_env_down(tmp_path: Path) -> None:
    """``python -m tests.cluster up`` gives a working cluster; ``down`` stops every process it started."""
    base = [sys.executable, "-m", "tests.cluster", "--dir", str(tmp_path)]
    up = subprocess.run([*base, "up", "--gpus", "2"], cwd=REPO, capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((tmp_path / "state.json").read_text())
        env = dict(os.environ)
        for line in up.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.replace("$PATH", os.environ["PATH"])
        nodes = subprocess.run(
            ["kubectl", "get", "nodes", "-o", "json"], env=env, capture_output=True, text=True
        )
        assert nodes.returncode == 0, nodes.stderr
        [node] = json.loads(nodes.stdout)["items"]
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    finally:
        down = subprocess.run([*base, "down"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    for pid in [state["supervisor_pid"], *state["pids"].values()]:
        assert not is_running(pid), f"pid {pid} survived `down`"


@pytest.mark.cluster
def test_init_container_restart_policy_and_image_map(cluster: Cluster, k8s_api: Any, namespace: str) -> None:
    """Init containers run first; OnFailure restarts in place; an image without command uses the image map."""
    core = client.CoreV1Api(k8s_api)
    cluster.kubelet.image_commands["example.com/flaky"] = ["sh", "-c"]
    flaky = "n=$(cat /w/count 2>/dev/null || echo 0); echo $((n+1)) > /w/count; cat /w/init; [ $n -ge 1 ]"
    pod = pod_manifest(
        "restarts",
        [],
        restartPolicy="OnFailure",
        initContainers=[
            {
                "name": "init",
                "image": "busybox",
                "command": ["sh", "-c", "echo from-init > /w/init"],
                "volumeMounts": [{"name": "w", "mountPath": "/w"}],
            }
        ],
        container={
            "image": "example.com/flaky:1.0",
            "args": [flaky],
            "volumeMounts": [{"name": "w", "mountPath": "/w"}],
        },
        volumes=[{"name": "w", "emptyDir": {}}],
    )
    del pod["spec"]["containers"][0]["command"]
    core.create_namespaced_pod(namespace, pod)
    done = wait(
        "pod Succeeded after one restart",
        lambda: (
            p if (p := core.read_namespaced_pod("restarts", namespace)).status.phase == "Succeeded" else None
        ),
        60,
        lambda: cluster.dump(namespace),
    )
    status = done.status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert done.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert "from-init" in cluster.kubelet.logs(namespace, "restarts")


@pytest.mark.cluster
def test_missing_secret_blocks_container_until_created(
    cluster: Cluster, k8s_api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "late", "key": "t"}}}]
    core.create_namespaced_pod(
        namespace,
        pod_manifest("waits", ["sh", "-c", 'printf "$T" > /dev/termination-log'], container={"env": env}),
    )

    def config_error() -> bool:
        st = core.read_namespaced_pod("waits", namespace).status.container_statuses
        return bool(st and st[0].state.waiting and st[0].state.waiting.reason == "CreateContainerConfigError")

    wait("CreateContainerConfigError", config_error, 30)
    assert core.read_namespaced_pod("waits", namespace).status.phase == "Pending"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "late"}, "stringData": {"t": "arrived"}})
    pod = wait(
        "pod Succeeded",
        lambda: (
            p if (p := core.read_namespaced_pod("waits", namespace)).status.phase == "Succeeded" else None
        ),
        30,
    )
    assert pod.status.container_statuses[0].state.terminated.message == "arrived"


S3_SCRIPT = """
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")
s3.put_object(Bucket=os.environ["BUCKET"], Key="from-pod", Body=b"written by a pod")
print("ok")
"""


@pytest.mark.cluster
@pytest.mark.s3
def test_pod_gets_s3_credentials_from_secret(
    cluster: Cluster, k8s_api: Any, namespace: str, s3: S3Server, s3_bucket: str, s3_secret: str
) -> None:
    """Credentials reach a pod only through the referenced Secret, and radosgw accepts them."""
    core = client.CoreV1Api(k8s_api)
    env = [{"name": "S3_ENDPOINT", "value": s3.endpoint}, {"name": "BUCKET", "value": s3_bucket}]
    container = {"env": env, "envFrom": [{"secretRef": {"name": s3_secret}}]}
    core.create_namespaced_pod(
        namespace, pod_manifest("uploader", ["python", "-c", S3_SCRIPT], container=container)
    )
    wait(
        "uploader Succeeded",
        lambda: core.read_namespaced_pod("uploader", namespace).status.phase == "Succeeded",
        60,
        lambda: cluster.dump(namespace),
    )
    assert s3.client().get_object(Bucket=s3_bucket, Key="from-pod")["Body"].read() == b"written by a pod"


@pytest.mark.cluster
def test_rbac_is_enforced_for_service_accounts(cluster: Cluster, k8s_api: Any, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    with cluster.api_client_as(namespace, "default") as api:
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(api).list_namespaced_pod(namespace)
        assert e.value.status == 403
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
            },
        )
        wait(
            "RBAC grant effective",
            lambda: client.CoreV1Api(api).list_namespaced_pod(namespace) is not None,
            10,
        )
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(api).create_namespaced_pod(namespace, pod_manifest("nope", ["true"]))
        assert e.value.status == 403
    kubeconfig = cluster.kubeconfig_for(namespace)
    out = subprocess.run(
        [str(cluster_tools() / "kubectl"), f"--kubeconfig={kubeconfig}", "auth", "can-i", "create", "pods"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "no"


@pytest.mark.cluster
def test_kubeconfig_serves_kubectl_helm_and_python_client(cluster: Cluster, namespace: str) -> None:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # what kopf's client login uses
    with api:
        names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
    assert namespace in names
    cm = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}, "data": {"a": "b"}}
    )
    out = cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=cm)
    assert "configmap/dry created (server dry run)" in out
    assert cluster.kubectl("-n", namespace, "get", "configmaps", "-o", "name").count("configmap/dry") == 0
    assert cluster.helm("list", "-n", namespace, "-q").strip() == ""
    assert "v4." in cluster.helm("version", "--short")


@pytest.mark.cluster
def test_kill_records_reason_and_node_loss_can_delete_pods(
    k8s_api: Any, namespace: str, node_factory: Callable[..., Any]
) -> None:
    core = client.CoreV1Api(k8s_api)
    node = node_factory("node-doomed", gpus=0, labels={"doomed": "yes"})
    sel = {"doomed": "yes"}
    core.create_namespaced_pod(namespace, pod_manifest("oom", ["sleep", "300"], nodeSelector=sel))
    core.create_namespaced_pod(namespace, pod_manifest("lost", ["sleep", "300"], nodeSelector=sel))
    for name in ("oom", "lost"):
        wait(
            f"{name} Running",
            lambda n=name: core.read_namespaced_pod(n, namespace).status.phase == "Running",
            30,
        )

    node.kill(namespace, "oom", reason="OOMKilled")
    pod = wait(
        "oom Failed",
        lambda: p if (p := core.read_namespaced_pod("oom", namespace)).status.phase == "Failed" else None,
        30,
    )
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.signal) == (137, "OOMKilled", 9)

    node.fail_node(pods="delete")

    def lost_gone() -> bool:
        try:
            core.read_namespaced_pod("lost", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait("pod on the lost node deleted", lost_gone, 30)


@pytest.mark.cluster
def test_pvc_bound_to_hostpath_pv_is_shared_storage(
    cluster: Cluster, k8s_api: Any, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(k8s_api)
    pv_name = f"pv-{namespace}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": str(tmp_path / "pv")},
                "storageClassName": "manual",
                "claimRef": {"namespace": namespace, "name": "data"},
            },
        }
    )
    try:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "manual",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        pod = pod_manifest(
            "writer",
            ["sh", "-c", "echo persisted > /data/file"],
            container={"volumeMounts": [{"name": "d", "mountPath": "/data"}]},
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
        )
        core.create_namespaced_pod(namespace, pod)
        wait(
            "writer Succeeded",
            lambda: core.read_namespaced_pod("writer", namespace).status.phase == "Succeeded",
            60,
            lambda: cluster.dump(namespace),
        )
        assert (tmp_path / "pv" / "file").read_text().strip() == "persisted"
    finally:
        core.delete_persistent_volume(pv_name)


# --------------------------------------------------------------------------- empty strings (build.sh's kube-openapi patch)


@pytest.mark.cluster
def test_empty_strings_round_trip_in_custom_resources_and_configmaps(
    k8s_api: Any, namespace: str, widget_crd: tuple[str, str]
) -> None:
    """Real Kubernetes accepts "" for a string field and keeps it (it is not null).

    Built with Go >= 1.16, v1.20.2's schema validator took every "" for null
    (`Invalid value: "null"`), in spec and status alike; build.sh patches it (see its README).
    """
    group, plural = widget_crd
    co = client.CustomObjectsApi(k8s_api)
    body = {
        "apiVersion": f"{group}/v1",
        "kind": "Widget",
        "metadata": {"name": "empty", "annotations": {"note": ""}, "labels": {"tier": ""}},
        "spec": {"replicas": 1, "image": ""},
    }
    created = co.create_namespaced_custom_object(group, "v1", namespace, plural, body)
    assert created["spec"] == {"replicas": 1, "image": ""}
    assert created["metadata"]["annotations"] == {"note": ""}

    patched = co.patch_namespaced_custom_object_status(
        group, "v1", namespace, plural, "empty", {"status": {"phase": ""}}
    )
    assert patched["status"] == {"phase": ""}

    # A replace (PUT) of spec and status with "" again, then a fresh read from storage.
    replaced = co.replace_namespaced_custom_object(
        group, "v1", namespace, plural, "empty", {**patched, "spec": {"replicas": 2, "image": ""}}
    )
    assert replaced["spec"] == {"replicas": 2, "image": ""}
    stored = co.get_namespaced_custom_object(group, "v1", namespace, plural, "empty")
    assert stored["spec"] == {"replicas": 2, "image": ""}
    assert stored["status"] == {"phase": ""}
    assert stored["metadata"]["labels"] == {"tier": ""}

    # "" is not null: a real null for a non-nullable field without a default is pruned (v1.20
    # decoding), so the field is gone, while "" stays.
    null_image = {**body, "metadata": {"name": "null"}, "spec": {"replicas": 1, "image": None}}
    created = co.create_namespaced_custom_object(group, "v1", namespace, plural, null_image)
    assert created["spec"] == {"replicas": 1}

    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "empty", "annotations": {"note": ""}}, "data": {"a": "", "b": "x"}}
    )
    cm = core.read_namespaced_config_map("empty", namespace)
    assert cm.data == {"a": "", "b": "x"}
    assert cm.metadata.annotations == {"note": ""}


@pytest.mark.cluster
def test_pod_logs_through_the_api_server(cluster: Cluster, k8s_api: Any, namespace: str) -> None:
    """pods/log is proxied by the API server to the process kubelet (kubectl logs works)."""
    core = client.CoreV1Api(k8s_api)

    def logs(**kw: Any) -> str:
        # The raw body: kubernetes-client >= 32 returns str(bytes) for pods/log otherwise.
        return str(
            core.read_namespaced_pod_log("talker", namespace, _preload_content=False, **kw).data.decode()
        )

    script = "for i in 1 2 3 4 5; do echo line $i; done; sleep 30"
    core.create_namespaced_pod(namespace, pod_manifest("talker", ["sh", "-c", script]))
    wait("pod Running", lambda: core.read_namespaced_pod("talker", namespace).status.phase == "Running", 60)
    text = wait(
        "five lines",
        lambda: t if (t := logs(container="main")).count("\n") >= 5 else None,
        30,
    )
    assert text == "".join(f"line {i}\n" for i in range(1, 6))
    assert logs(tail_lines=2) == "line 4\nline 5\n"
    assert logs(limit_bytes=7) == "line 1\n"
    assert cluster.kubectl("-n", namespace, "logs", "talker", "--tail=1") == "line 5\n"
    with pytest.raises(client.ApiException) as err:
        logs(container="nope")
    assert err.value.status == 400  # the API server checks the container name itself
    core.delete_namespaced_pod("talker", namespace, grace_period_seconds=0)


@pytest.mark.cluster
def test_kubectl_logs_follow_streams_until_the_container_exits(
    cluster: Cluster, k8s_api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace, pod_manifest("streamer", ["sh", "-c", "echo first; sleep 3; echo second"])
    )
    wait("pod Running", lambda: core.read_namespaced_pod("streamer", namespace).status.phase == "Running", 60)
    # Started while the container runs; returns only once it has exited, with both lines.
    assert cluster.kubectl("-n", namespace, "logs", "-f", "streamer", timeout=60) == "first\nsecond\n"


@pytest.mark.cluster
def test_pods_behind_a_headless_service_resolve_each_other(k8s_api: Any, namespace: str) -> None:
    """<hostname>.<subdomain> names, as CoreDNS serves them, for a gang's rendezvous."""
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_service(
        namespace,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang"},
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"gang": "g"},
                  "ports": [{"port": 29500}]}},
    )  # fmt: skip
    probe = (
        "import socket, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try: print(name, socket.getaddrinfo(name, 29500, type=socket.SOCK_STREAM)[0][4][0])\n"
        "    except OSError: print(name, 'unresolved')\n"
    )
    names = [
        "r0.gang",
        f"r0.gang.{namespace}.svc",
        f"r0.gang.{namespace}.svc.cluster.local",
        "loner.gang",
        "localhost",
    ]
    for name in ("r0", "r1"):
        pod = pod_manifest(name, [sys.executable, "-c", probe, *names] if name == "r1" else ["sleep", "60"],
                           hostname=name, subdomain="gang")  # fmt: skip
        pod["metadata"]["labels"] = {"gang": "g"}
        core.create_namespaced_pod(namespace, pod)
    # A pod with a DNS name but not selected by the Service gets no record.
    core.create_namespaced_pod(
        namespace, pod_manifest("loner", ["sleep", "60"], hostname="loner", subdomain="gang")
    )
    wait(
        "r1 done",
        lambda: core.read_namespaced_pod("r1", namespace).status.phase in ("Succeeded", "Failed"),
        60,
    )
    out = cluster_logs(k8s_api, namespace, "r1")
    assert out.splitlines() == [
        "r0.gang 127.0.0.1",
        f"r0.gang.{namespace}.svc 127.0.0.1",
        f"r0.gang.{namespace}.svc.cluster.local 127.0.0.1",
        "loner.gang unresolved",
        "localhost 127.0.0.1",
    ], out
    for name in ("r0", "loner"):
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def cluster_logs(k8s_api: Any, namespace: str, pod: str) -> str:
    raw = client.CoreV1Api(k8s_api).read_namespaced_pod_log(pod, namespace, _preload_content=False)
    return str(raw.data.decode())

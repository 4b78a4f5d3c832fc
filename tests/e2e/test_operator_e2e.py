"""The operator end to end: real control plane, process kubelet, radosgw, real stages.

`kubectl apply` a tiny Distillation -> BranchJobs -> pods running the real
`branchmerge-train sft` on a tiny model with data in S3 -> merge Job -> eval Job -> status
with scores and Succeeded; the merged model and its manifest are in the bucket. Along the
way the operator (`branchmerge operator`, a subprocess) is SIGKILLed and restarted at every
phase, and every child ever created is recorded from a watch: nothing is created twice and
nothing restarts. Then a spec change re-runs only the changed branch, the merge and the
eval, and deleting the Distillation removes its children but leaves committed outputs.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.cluster import Cluster, S3Server
from tests.operator_kit import (
    TINY_TRAINING,
    Api,
    OperatorProcess,
    apply,
    describe,
    install_crds,
    keys,
    tiny_student,
    upload_inputs,
    wait_events,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log").start()
    try:
        yield op
    finally:
        op.stop()


class ChildRecorder:
    """Every BranchJob, Job and Pod ADDED in a namespace (name -> uids), from watches."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.added: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self._stop = threading.Event()
        core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        custom = client.CustomObjectsApi(api_client)
        sources = {
            "Pod": lambda **kw: core.list_namespaced_pod(namespace, **kw),
            "Job": lambda **kw: batch.list_namespaced_job(namespace, **kw),
            "BranchJob": lambda **kw: custom.list_namespaced_custom_object(
                "branchmerge.io", "v1alpha1", namespace, "branchjobs", **kw
            ),
        }
        self._threads = [
            threading.Thread(target=self._watch, args=(k, f), daemon=True) for k, f in sources.items()
        ]
        for t in self._threads:
            t.start()

    def _watch(self, kind: str, list_fn: Any) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(list_fn, timeout_seconds=5):
                    obj = ev["object"]
                    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
                    if ev["type"] == "ADDED" and meta["uid"] not in self.added[kind][meta["name"]]:
                        self.added[kind][meta["name"]].append(meta["uid"])
                    if self._stop.is_set():
                        w.stop()
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def names(self, kind: str) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.added[kind].items()}


def distillation(ns: str, inputs: dict[str, str], endpoint: str, secret: str) -> dict[str, Any]:
    branch = {
        "training": dict(TINY_TRAINING),
        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "100m", "memory": "2Gi"},
    }
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": "e2e", "namespace": ns},
        "spec": {
            "student": {"uri": inputs["student"]},
            "teacher": {"name": "arithmetic-teacher"},
            "output": {
                "uri": inputs["student"].rsplit("/models/", 1)[0] + "/runs/e2e",
                "endpoint": endpoint,
                "credentialsSecret": secret,
            },
            "branches": [
                {"name": "math", "datasets": [{"uri": inputs["math"]}], **copy.deepcopy(branch)},
                {"name": "code", "datasets": [{"uri": inputs["code"]}], **copy.deepcopy(branch)},
            ],
            "merge": {
                "method": "arcee_fusion",
                "dtype": "float32",
                "resources": {"cpu": "100m", "memory": "2Gi"},
            },
            "eval": {
                "models": ["merged"],
                "batchSize": 4,
                "backend": "transformers",
                "benchmarks": [
                    {
                        "name": "arith",
                        "kind": "math",
                        "uri": inputs["bench"],
                        "samples": 1,
                        "temperature": 0,
                        "maxNewTokens": 8,
                        "maxProblems": 4,
                    }
                ],
                "resources": {"cpu": "100m", "memory": "2Gi"},
            },
            "runPolicy": {"backoffLimit": 1, "startupDeadlineSeconds": 300},
        },
    }


def test_distillation_end_to_end_with_operator_restarts(
    cluster: Cluster, k8s_api: Any, s3: S3Server, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    api = Api(k8s_api)
    ns = namespace
    bucket = s3.create_bucket()
    inputs = upload_inputs(s3, bucket, tiny_student(tmp_path))
    secret = s3.create_secret(k8s_api, ns, name="s3-creds")
    recorder = ChildRecorder(k8s_api, ns)
    manifest = distillation(ns, inputs, s3.endpoint, secret)
    started = time.monotonic()
    apply(cluster, ns, manifest)
    debug = lambda: describe(api, ns) + "\n--- operator ---\n" + operator.tail(40)  # noqa: E731

    # ---- generation 1, with a SIGKILL + restart of the operator at every phase
    def phase() -> str | None:
        return api.phase("distillations", ns, "e2e")

    wait_for("BranchJobs created", lambda: len(api.list("branchjobs", ns)) == 2, 60, debug=debug)
    operator.restart()  # children exist, pods may not yet
    wait_for(
        "a training pod running",
        lambda: any(p.status.phase == "Running" for p in api.pods(ns)),
        120,
        debug=debug,
    )
    operator.restart()  # mid-training
    wait_for("merge Job", lambda: api.jobs(ns), 300, debug=debug)
    operator.restart()  # merging
    wait_for("phase Evaluating or later", lambda: phase() in ("Evaluating", "Succeeded"), 300, debug=debug)
    operator.restart()  # evaluating (or just done)
    wait_for("Succeeded", lambda: phase() in ("Succeeded", "Failed"), 300, debug=debug)
    first_run = time.monotonic() - started
    dist = api.get("distillations", ns, "e2e") or {}
    st = dist["status"]
    assert st["phase"] == "Succeeded", debug()
    operator.restart()  # terminal: a restarted operator must not touch anything
    time.sleep(3)

    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Succeeded"]["status"] == "True"
    assert conditions["Stalled"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in st["conditions"])
    assert st["observedGeneration"] == 1 and st["branchesSucceeded"] == "2/2"
    assert [b["restarts"] for b in st["branches"]] == [0, 0]
    [score] = st["evaluation"]["results"]
    assert score["model"] == "merged" and score["benchmark"] == "arith" and score["samples"] == 4
    assert 0.0 <= score["score"] <= 1.0
    assert st["headline"].startswith("arith=")
    merged = st["mergedModel"]
    assert merged.startswith(f"s3://{bucket}/runs/e2e/merge/")
    merged_keys = keys(s3, bucket, merged.split(f"s3://{bucket}/", 1)[1])
    assert any(k.endswith("_MANIFEST.json") for k in merged_keys) and any(
        k.endswith(".safetensors") for k in merged_keys
    )
    manifest_key = next(k for k in merged_keys if k.endswith("_MANIFEST.json"))
    assert json.loads(s3.client().get_object(Bucket=bucket, Key=manifest_key)["Body"].read())["fingerprint"]

    # No duplicates across five operator restarts: one uid per child name, one of each stage.
    pods_v1, jobs_v1, bjs_v1 = recorder.names("Pod"), recorder.names("Job"), recorder.names("BranchJob")
    assert sorted(bjs_v1) == ["e2e-code", "e2e-math"] and all(len(u) == 1 for u in bjs_v1.values()), bjs_v1
    assert sorted(k for k in pods_v1 if not k.startswith(("e2e-merge", "e2e-eval"))) == [
        "e2e-code-0",
        "e2e-math-0",
    ]
    assert all(len(u) == 1 for u in pods_v1.values()), pods_v1
    assert len(jobs_v1) == 2 and all(len(u) == 1 for u in jobs_v1.values()), jobs_v1
    assert api.get("distillations", ns, "e2e")["status"] == st, (
        "a restarted operator changed a finished status"
    )

    # Credentials only through the Secret: in no spec, status, event or operator log line.
    creds = (s3.access_key, s3.secret_key)
    for pod in api.pods(ns):
        c = pod.spec.containers[0]
        assert [e.secret_ref.name for e in c.env_from] == [secret]
        assert not any(e.value and any(x in e.value for x in creds) for e in c.env or [])
        assert pod.spec.automount_service_account_token is False
        assert c.security_context.read_only_root_filesystem and c.security_context.run_as_non_root
    texts = [json.dumps(api.list(p, ns)) for p in ("distillations", "branchjobs")]
    texts += [str(e.message) for e in api.events(ns)] + [operator.log()]
    assert not any(x in t for t in texts for x in creds)

    # Progress stays visible in `kubectl get`: the printer columns work on the real objects.
    table = cluster.kubectl("get", "distillations,branchjobs", "-n", ns)
    assert "e2e-math" in table and "2/2" in table and "arith=" in table

    # ---- a spec change after success re-runs only the changed branch, the merge and the eval
    math_out = next(b["outputUri"] for b in st["branches"] if b["name"] == "math")
    math_manifest = math_out.split(f"s3://{bucket}/", 1)[1] + "/_MANIFEST.json"
    math_stamp = s3.client().head_object(Bucket=bucket, Key=math_manifest)["LastModified"]
    math_uid = api.get("branchjobs", ns, "e2e-math")["metadata"]["uid"]
    code_uid = api.get("branchjobs", ns, "e2e-code")["metadata"]["uid"]
    changed = copy.deepcopy(manifest)
    changed["spec"]["branches"][1]["training"]["learningRate"] = 2.0e-3
    apply(cluster, ns, changed)
    wait_for("generation 2 Succeeded", lambda: (
        (d := api.get("distillations", ns, "e2e") or {}).get("status", {}).get("observedGeneration") == 2
        and d["status"].get("phase") in ("Succeeded", "Failed")), 400, debug=debug)  # fmt: skip
    st2 = api.get("distillations", ns, "e2e")["status"]
    assert st2["phase"] == "Succeeded", debug()
    assert api.get("branchjobs", ns, "e2e-math")["metadata"]["uid"] == math_uid
    assert api.get("branchjobs", ns, "e2e-code")["metadata"]["uid"] != code_uid
    assert s3.client().head_object(Bucket=bucket, Key=math_manifest)["LastModified"] == math_stamp
    pods_v2 = recorder.names("Pod")
    assert pods_v2["e2e-math-0"] == pods_v1["e2e-math-0"], "the unchanged branch ran again"
    assert len(pods_v2["e2e-code-0"]) == 2
    assert st2["mergedModel"] != merged and st2["evaluation"]["results"][0]["benchmark"] == "arith"
    assert len(recorder.names("Job")) == 4  # a new merge and a new eval Job (new fingerprints)
    wait_events(api, ns, "e2e", "SpecChanged", "Succeeded")

    # ---- deleting the Distillation removes children, keeps committed outputs
    outputs = keys(s3, bucket, "runs/e2e/")
    api.delete("distillations", ns, "e2e")

    def all_gone() -> bool:
        return (api.get("distillations", ns, "e2e") is None and not api.list("branchjobs", ns) and not api.jobs(ns)
                and not api.pods(ns) and not api.core.list_namespaced_service(ns).items)  # fmt: skip

    wait_for("children garbage-collected", all_gone, 120, debug=debug)
    recorder.stop()
    remaining = keys(s3, bucket, "runs/e2e/")
    assert [k for k in outputs if k.endswith("_MANIFEST.json") and "/checkpoints/" not in k]
    assert set(outputs) <= set(remaining)
    print(
        f"\ngeneration 1 (5 operator restarts): {first_run:.0f}s; whole test {time.monotonic() - started:.0f}s"
    )


def real_branchjob(cluster: Cluster, k8s_api: Any, s3: S3Server, ns: str, tmp_path: Path, name: str, *,
                   nodes: int, backoff_limit: int, training: dict[str, Any]) -> str:  # fmt: skip
    """Apply a BranchJob that trains the tiny student for real on data in a fresh bucket."""
    bucket = s3.create_bucket()
    inputs = upload_inputs(s3, bucket, tiny_student(tmp_path))
    secret = s3.create_secret(k8s_api, ns, name="s3-creds")
    output = {"uri": f"s3://{bucket}/runs/{name}", "endpoint": s3.endpoint, "credentialsSecret": secret}
    apply(cluster, ns, {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "BranchJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "student": {"uri": inputs["student"]},
            "datasets": [{"uri": inputs["math"]}],
            "training": {**TINY_TRAINING, "epochs": 100, **training},
            "resources": {"nodes": nodes, "gpusPerNode": 0, "cpu": "100m", "memory": "2Gi"},
            "output": output,
            "runPolicy": {"backoffLimit": backoff_limit},
        },
    })  # fmt: skip
    return bucket


def test_training_pod_failure_restarts_gang_from_checkpoint(
    cluster: Cluster, k8s_api: Any, s3: S3Server, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """A training pod killed after a checkpoint: the gang restarts once and resumes from it."""
    api, ns = Api(k8s_api), namespace
    bucket = real_branchjob(cluster, k8s_api, s3, ns, tmp_path, "crashy", nodes=1, backoff_limit=2,
                            training={"maxSteps": 60, "checkpointInterval": 2})  # fmt: skip
    debug = lambda: describe(api, ns) + "\n--- operator ---\n" + operator.tail(30)  # noqa: E731
    wait_for("a committed checkpoint", lambda: any(
        k.endswith("_MANIFEST.json") for k in keys(s3, bucket, "runs/crashy/branches/crashy/")
        if "/checkpoints/" in k), 180, interval=0.1, debug=debug)  # fmt: skip
    cluster.kubelet.kill(ns, "crashy-0")  # SIGKILL mid-training: exit 137, a failure (not a disruption)
    wait_for(
        "Succeeded",
        lambda: api.phase("branchjobs", ns, "crashy") in ("Succeeded", "Failed"),
        240,
        debug=debug,
    )
    st = api.get("branchjobs", ns, "crashy")["status"]
    assert st["phase"] == "Succeeded", debug()
    assert st["restarts"] == 1 and st["disruptions"] == 0 and st["attempt"] == 1
    pod = api.core.read_namespaced_pod("crashy-0", ns)
    assert pod.metadata.labels["branchmerge.io/attempt"] == "1"
    result = json.loads(pod.status.container_statuses[0].state.terminated.message)
    assert result["status"] == "Succeeded" and result["metrics"]["resumed_from_step"] >= 2
    assert result["metrics"]["steps"] == 60
    wait_events(api, ns, "crashy", "Restarting", "Succeeded")
    assert operator.metric("branchmerge_gang_restarts_total", cause="failure") >= 1


def test_two_node_gang_trains_for_real_through_its_headless_service(
    cluster: Cluster, k8s_api: Any, s3: S3Server, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """Two pods, one rank each: rank 1 finds rank 0 by the DNS name the operator put in
    MASTER_ADDR (`<bj>-0.<service>`), they train together (gloo) and rank 0 publishes the
    model and the result."""
    from tests.cluster.dns import UNSHARE

    assert UNSHARE is not None, "pod DNS needs a mount namespace (unshare --mount, as root or via a user namespace)"
    api, ns = Api(k8s_api), namespace
    bucket = real_branchjob(cluster, k8s_api, s3, ns, tmp_path, "duo", nodes=2, backoff_limit=0,
                            training={"maxSteps": 6, "globalBatchSize": 4, "microBatchSize": 2})  # fmt: skip
    debug = lambda: describe(api, ns) + "\n--- operator ---\n" + operator.tail(30)  # noqa: E731
    wait_for(
        "Succeeded", lambda: api.phase("branchjobs", ns, "duo") in ("Succeeded", "Failed"), 240, debug=debug
    )
    st = api.get("branchjobs", ns, "duo")["status"]
    assert st["phase"] == "Succeeded" and st["restarts"] == 0, debug()
    pods = {p.metadata.name: p for p in api.pods(ns)}
    assert set(pods) == {"duo-0", "duo-1"}
    env = {e.name: e.value for e in pods["duo-1"].spec.containers[0].env}
    assert env["MASTER_ADDR"] == "duo-0.duo" and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    result = json.loads(pods["duo-0"].status.container_statuses[0].state.terminated.message)
    assert result["status"] == "Succeeded" and result["metrics"]["world_size"] == 2
    assert result["metrics"]["steps"] == 6
    assert any(k.endswith("_MANIFEST.json") for k in keys(s3, bucket, "runs/duo/branches/duo/"))
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 6, st

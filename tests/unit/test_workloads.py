"""Every pod the operator creates: security, torchrun environment, Kueue labels, credentials.

Pure: the planners produce what to create, workloads.py renders it; no cluster needed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from branchmerge_operator import workloads
from branchmerge_operator.api import BranchJob, Distillation
from branchmerge_operator.gang import plan_branchjob
from branchmerge_operator.pipeline import Observed, StageJob, plan_distillation
from branchmerge_trainer.stages import parse_stage

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def branchjob(**spec: Any) -> BranchJob:
    base: dict[str, Any] = {
        "student": {"uri": "s3://b/student"},
        "datasets": [{"uri": "s3://b/data.jsonl"}],
        "training": {"globalBatchSize": 16, "microBatchSize": 1},
        "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": "32", "memory": "512Gi",
                      "nodeSelector": {"gpu": "h100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "priorityClassName": "training"},
        "output": {"uri": "s3://b/out", "endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
        "image": {"image": "registry.example/trainer:1", "pullSecrets": ["regcred"]},
        "queueName": "team-a",
    }
    base.update(spec)
    return BranchJob.model_validate(
        {"apiVersion": "branchmerge.io/v1alpha1", "kind": "BranchJob",
         "metadata": {"name": "tiny-math", "namespace": "ns", "generation": 1}, "spec": base}
    )  # fmt: skip


def gang_pods(bj: BranchJob) -> list[dict[str, Any]]:
    plan = plan_branchjob(bj, [], NOW)
    assert plan.stage is not None and len(plan.create_pods) == bj.spec.resources.nodes
    settings = workloads.settings_for_branchjob(bj.spec)
    return [workloads.gang_pod(p, namespace="ns", stage=plan.stage, settings=settings) for p in plan.create_pods]


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def test_gang_pods_are_hardened_and_carry_no_credentials() -> None:
    for pod in gang_pods(branchjob()):
        spec = pod["spec"]
        (c,) = spec["containers"]
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["privileged"] is False
        # Credentials only from the referenced Secret, never as values.
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert not [e for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert not any(k.startswith("AWS_") for k in env_of(pod))
        # Writable scratch on a read-only root: /scratch, /tmp, memory-backed /dev/shm.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert set(mounts) == {"/scratch", "/tmp", "/dev/shm"}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
        assert env_of(pod)["BRANCHMERGE_WORKDIR"] == "/scratch"
        assert c["terminationMessagePath"] == "/dev/termination-log"


def test_gang_pods_placement_resources_and_image() -> None:
    pod = gang_pods(branchjob())[0]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["resources"] == {
        "requests": {"cpu": "32", "memory": "512Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "512Gi", "nvidia.com/gpu": "8"},
    }
    assert spec["nodeSelector"] == {"gpu": "h100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "training"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["image"] == "registry.example/trainer:1"


def test_torchrun_rendezvous_through_the_headless_service() -> None:
    pods = gang_pods(branchjob())
    assert [p["metadata"]["name"] for p in pods] == ["tiny-math-0", "tiny-math-1"]
    for rank, pod in enumerate(pods):
        env = env_of(pod)
        assert env["MASTER_ADDR"] == "tiny-math-0.tiny-math"  # rank 0's DNS name via the Service
        assert env["MASTER_PORT"] == "29500"
        assert env["NNODES"] == env["PET_NNODES"] == "2"
        assert env["NODE_RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["NPROC_PER_NODE"] == env["PET_NPROC_PER_NODE"] == "8"
        assert env["WORLD_SIZE"] == "16"
        assert "RANK" not in env  # torchrun assigns global ranks to its 8 workers
        assert pod["spec"]["hostname"] == pod["metadata"]["name"] and pod["spec"]["subdomain"] == "tiny-math"
        cmd = pod["spec"]["containers"][0]["command"]
        assert cmd[0] == "torchrun" and "--nproc-per-node=$(NPROC_PER_NODE)" in cmd and "--max-restarts=0" in cmd
        assert cmd[-3:] == ["sft", "--config", "env:BRANCHMERGE_STAGE"]


def test_one_process_per_pod_runs_the_stage_directly() -> None:
    bj = branchjob(resources={"nodes": 2, "gpusPerNode": 0}, training={"globalBatchSize": 4})
    for rank, pod in enumerate(gang_pods(bj)):
        env = env_of(pod)
        assert pod["spec"]["containers"][0]["command"] == ["branchmerge-train", "sft", "--config", "env:BRANCHMERGE_STAGE"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
        assert "resources" not in pod["spec"]["containers"][0] or "nvidia.com/gpu" not in json.dumps(pod)


def test_the_stage_config_travels_as_json_in_the_environment() -> None:
    bj = branchjob()
    pod = gang_pods(bj)[0]
    stage = parse_stage(json.loads(env_of(pod)["BRANCHMERGE_STAGE"]))
    plan = plan_branchjob(bj, [], NOW)
    assert plan.stage is not None and stage == plan.stage
    assert stage.kind == "SFT" and stage.distributed.nnodes == 2 and stage.distributed.nproc_per_node == 8


def test_kueue_labels_on_every_pod_of_the_gang() -> None:
    pods = gang_pods(branchjob())
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "tiny-math-g0"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert labels["app.kubernetes.io/managed-by"] == "branchmerge"
        assert labels["branchmerge.io/branch-job"] == "tiny-math" and labels["branchmerge.io/stage"] == "branch"
        assert labels["branchmerge.io/attempt"] == "0" and labels["branchmerge.io/rank"] in ("0", "1")
    no_queue = gang_pods(branchjob(queueName=None))[0]
    assert not [k for k in no_queue["metadata"]["labels"] if k.startswith("kueue")]
    assert "annotations" not in no_queue["metadata"]


def test_headless_service_selects_the_gang() -> None:
    bj = branchjob()
    plan = plan_branchjob(bj, [], NOW)
    assert plan.service is not None
    svc = workloads.gang_service(plan.service, namespace="ns")
    assert svc["metadata"]["name"] == "tiny-math"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"branchmerge.io/branch-job": "tiny-math"}
    assert svc["spec"]["ports"][0]["port"] == 29500


def distillation(**spec: Any) -> Distillation:
    base: dict[str, Any] = {
        "student": {"uri": "s3://b/student"},
        "output": {"uri": "s3://b/out", "credentialsSecret": "s3-creds"},
        "branches": [
            {"name": "math", "datasets": [{"uri": "s3://b/m.jsonl"}], "training": {"globalBatchSize": 8},
             "resources": {"gpusPerNode": 8}},
            {"name": "code", "datasets": [{"uri": "s3://b/c.jsonl"}], "training": {"globalBatchSize": 8},
             "resources": {"gpusPerNode": 8}},
        ],
        "merge": {"resources": {"cpu": "8", "memory": "256Gi", "gpus": 0}},
        "queueName": "team-a",
        "runPolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 7200},
    }
    base.update(spec)
    return Distillation.model_validate(
        {"apiVersion": "branchmerge.io/v1alpha1", "kind": "Distillation",
         "metadata": {"name": "tiny", "namespace": "ns", "generation": 1}, "spec": base}
    )  # fmt: skip


def merge_job() -> StageJob:
    from branchmerge_operator.pipeline import ObservedBranchJob

    dist = distillation()
    done = [ObservedBranchJob(name=f"tiny-{b}", branch=b, phase="Succeeded",
                              fingerprint=plan_distillation(dist, Observed(), NOW).branch_jobs[i].metadata.labels[
                                  "branchmerge.io/fingerprint"])
            for i, b in enumerate(("math", "code"))]  # fmt: skip
    plan = plan_distillation(dist, Observed(branch_jobs=done), NOW)
    [job] = [c for c in plan.create if isinstance(c, StageJob)]
    return job


def test_merge_job_runs_the_stage_once_with_a_backoff_limit() -> None:
    planned = merge_job()
    job = workloads.stage_job(planned, namespace="ns", active_deadline_seconds=600)
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == planned.name
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["completions"] == 1 and spec["activeDeadlineSeconds"] == 600
    pod = spec["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["branchmerge-train", "merge", "--config", "env:BRANCHMERGE_STAGE"]
    assert parse_stage(json.loads(env_of(pod)["BRANCHMERGE_STAGE"])).kind == "Merge"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "256Gi"}, "limits": {"memory": "256Gi"}}
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Kueue admits the Job by its own label; the pods carry ours but no Kueue labels.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert not [k for k in pod["metadata"]["labels"] if k.startswith("kueue")]
    assert pod["metadata"]["labels"]["branchmerge.io/distillation"] == "tiny"
    assert pod["metadata"]["labels"]["branchmerge.io/stage"] == "merge"


def test_planned_branchjob_body_has_no_status_and_only_user_metadata() -> None:
    plan = plan_distillation(distillation(), Observed(), NOW)
    body = workloads.branchjob_body(plan.branch_jobs[0])
    assert body["apiVersion"] == "branchmerge.io/v1alpha1" and body["kind"] == "BranchJob"
    assert "status" not in body
    assert set(body["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    BranchJob.model_validate(body)  # round-trips through the API model


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_gpu_requests_match_gpus_per_node(gpus: int) -> None:
    bj = branchjob(resources={"nodes": 1, "gpusPerNode": gpus}, training={"globalBatchSize": 4})
    res = gang_pods(bj)[0]["spec"]["containers"][0]["resources"]
    assert res.get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_unset_image_uses_the_operators_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm `trainer.image` reaches pods through BRANCHMERGE_TRAINER_IMAGE unless the spec names one."""
    unset = branchjob(image={"pullSecrets": ["regcred"]})
    monkeypatch.delenv(workloads.TRAINER_IMAGE_ENV, raising=False)
    assert gang_pods(unset)[0]["spec"]["containers"][0]["image"] == workloads.DEFAULT_IMAGE
    monkeypatch.setenv(workloads.TRAINER_IMAGE_ENV, "mirror.example/trainer@sha256:abc")
    assert gang_pods(unset)[0]["spec"]["containers"][0]["image"] == "mirror.example/trainer@sha256:abc"
    job = workloads.stage_job(merge_job(), namespace="ns", active_deadline_seconds=60)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "mirror.example/trainer@sha256:abc"
    # The spec's own image wins.
    assert gang_pods(branchjob())[0]["spec"]["containers"][0]["image"] == "registry.example/trainer:1"


def test_malformed_default_image_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="BRANCHMERGE_TRAINER_IMAGE"):
        workloads.default_trainer_image({"BRANCHMERGE_TRAINER_IMAGE": "bad image"})
    assert workloads.default_trainer_image({"BRANCHMERGE_TRAINER_IMAGE": "  "}) == workloads.DEFAULT_IMAGE

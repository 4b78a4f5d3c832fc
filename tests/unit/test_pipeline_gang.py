"""plan_branchjob: gang creation, whole-gang restarts, disruptions, deadlines, suspend.

Driven by a fake that applies the plan to a set of abstract pods (status written first, as
the plan asks), so multi-step stories read like what happens on a cluster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from branchmerge_operator.gang import BranchJobPlan, ObservedPod, plan_branchjob
from branchmerge_operator.naming import LABEL_ATTEMPT, LABEL_FINGERPRINT, LABEL_RANK
from branchmerge_trainer.stages import Progress, StageError, StageResult

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


BJ: dict[str, Any] = {
    "apiVersion": "branchmerge.io/v1alpha1",
    "kind": "BranchJob",
    "metadata": {
        "name": "r1-math",
        "namespace": "ml",
        "generation": 1,
        "labels": {"branchmerge.io/distillation": "r1", "branchmerge.io/branch": "math"},
    },
    "spec": {
        "stageName": "math",
        "student": {"uri": "s3://models/student"},
        "datasets": [{"uri": "s3://data/math.jsonl"}],
        "training": {"globalBatchSize": 32},
        "resources": {"nodes": 4, "gpusPerNode": 8},
        "output": {"uri": "s3://runs/r1"},
        "runPolicy": {"backoffLimit": 2, "startupDeadlineSeconds": 300},
        "queueName": "gpu",
    },
}


@dataclass
class Gang:
    obj: dict[str, Any]
    pods: dict[str, ObservedPod] = field(default_factory=dict)
    service: bool = False
    instant_delete: bool = True
    plans: list[BranchJobPlan] = field(default_factory=list)

    @classmethod
    def new(cls, **spec: Any) -> Gang:
        obj = copy.deepcopy(BJ)
        for key, value in spec.items():
            obj["spec"][key] = value if not isinstance(value, dict) else {**obj["spec"].get(key, {}), **value}
        return cls(obj)

    @property
    def status(self) -> dict[str, Any]:
        return self.obj.get("status") or {}

    def cond(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)

    def reconcile(self, now: datetime) -> BranchJobPlan:
        plan = plan_branchjob(self.obj, list(self.pods.values()), now)
        self.obj["status"] = plan.status.dump()
        for name in plan.delete_pods:
            assert name in self.pods
            if self.instant_delete:
                del self.pods[name]
            else:
                self.pods[name] = replace(self.pods[name], deleting=True)
        if plan.service is not None:
            self.service = True
        if plan.delete_service:
            self.service = False
        for pod in plan.create_pods:
            assert pod.name not in self.pods, f"{pod.name} created twice"
            self.pods[pod.name] = ObservedPod(
                name=pod.name,
                rank=pod.rank,
                attempt=pod.attempt,
                created=now,
                fingerprint=pod.labels[LABEL_FINGERPRINT],
            )
        self.plans.append(plan)
        return plan

    def set(self, rank: int, **changes: Any) -> None:
        name = f"r1-math-{rank}"
        self.pods[name] = replace(self.pods[name], **changes)

    def all(self, **changes: Any) -> None:
        for rank in range(len(self.pods)):
            self.set(rank, **changes)

    def gone(self) -> None:
        self.pods = {k: v for k, v in self.pods.items() if not v.deleting}

    def edit(self, **spec: Any) -> None:
        for key, value in spec.items():
            self.obj["spec"][key] = (
                value if not isinstance(value, dict) else {**self.obj["spec"].get(key, {}), **value}
            )
        self.obj["metadata"]["generation"] += 1

    def running(self, now: datetime) -> BranchJobPlan:
        self.reconcile(now)
        self.all(phase="Running")
        return self.reconcile(now + timedelta(seconds=1))


def result(ok: bool = True, reason: str = "InternalError") -> str:
    return StageResult(
        kind="SFT",
        status="Succeeded" if ok else "Failed",
        fingerprint="f",
        output="s3://runs/r1/branches/math/f/model" if ok else None,
        error=None if ok else StageError(reason=reason, message="CUDA error: an illegal memory access"),
    ).to_json()


# --------------------------------------------------------------------------- creation


def test_first_reconcile_creates_the_whole_gang_and_service() -> None:
    g = Gang.new()
    plan = g.reconcile(T0)
    assert [p.name for p in plan.create_pods] == ["r1-math-0", "r1-math-1", "r1-math-2", "r1-math-3"]
    assert plan.service is not None and plan.service.name == "r1-math"
    assert plan.service.selector == {"branchmerge.io/branch-job": "r1-math"}
    pod = plan.create_pods[2]
    assert pod.hostname == "r1-math-2" and pod.subdomain == "r1-math"
    assert pod.env["MASTER_ADDR"] == "r1-math-0.r1-math" and pod.env["NODE_RANK"] == "2"
    assert pod.env["NNODES"] == "4" and pod.env["NPROC_PER_NODE"] == "8" and pod.env["PET_NNODES"] == "4"
    assert pod.labels["kueue.x-k8s.io/queue-name"] == "gpu"
    assert pod.labels["kueue.x-k8s.io/pod-group-name"] == "r1-math-g0"
    assert pod.annotations["kueue.x-k8s.io/pod-group-total-count"] == "4"
    assert pod.labels[LABEL_RANK] == "2" and pod.labels[LABEL_ATTEMPT] == "0"
    assert pod.labels["branchmerge.io/distillation"] == "r1"
    assert plan.stage is not None and plan.stage.distributed.world_size == 32
    st = g.status
    assert st["phase"] == "Pending" and st["attempt"] == 0 and st["observedGeneration"] == 1
    assert st["checkpointUri"].endswith("/checkpoints") and st["fingerprint"] == plan.stage.fingerprint
    assert {c["type"] for c in st["conditions"]} >= {
        "Ready",
        "Succeeded",
        "Failed",
        "Reconciling",
        "Stalled",
        "Running",
    }
    assert plan.requeue_after == 300.0


def test_no_queue_no_kueue_labels() -> None:
    g = Gang.new()
    del g.obj["spec"]["queueName"]
    pod = g.reconcile(T0).create_pods[0]
    assert not [k for k in pod.labels if k.startswith("kueue")]


def test_running_with_progress_from_rank_zero() -> None:
    g = Gang.new()
    g.reconcile(T0)
    g.all(phase="Running")
    g.set(0, progress=Progress(step=40, total_steps=400, loss=1.25, tokens_per_second=9000, eta_seconds=3600))
    g.set(1, progress=Progress(step=1, total_steps=400))
    plan = g.reconcile(at(60))
    assert g.status["phase"] == "Running" and g.status["progress"]["step"] == 40
    assert g.cond("Running")["status"] == "True" and g.cond("Ready")["status"] == "False"
    assert plan.create_pods == [] and plan.delete_pods == [] and plan.requeue_after == 60.0


def test_missing_ranks_right_after_creation_are_created() -> None:
    g = Gang.new()
    g.reconcile(T0)
    del g.pods["r1-math-3"]  # e.g. the create hit a transient error
    plan = g.reconcile(at(5))
    assert [p.name for p in plan.create_pods] == ["r1-math-3"]
    assert g.status["phase"] == "Pending"


# --------------------------------------------------------------------------- failures


def test_one_failed_pod_restarts_the_whole_gang() -> None:
    g = Gang.new()
    g.instant_delete = False
    g.running(T0)
    g.set(2, phase="Failed", exit_code=1, termination_message=result(False))
    plan = g.reconcile(at(100))
    assert sorted(plan.delete_pods) == ["r1-math-0", "r1-math-1", "r1-math-2", "r1-math-3"]
    st = g.status
    assert (
        st["phase"] == "Restarting"
        and st["restarts"] == 1
        and st["attempt"] == 1
        and st.get("disruptions", 0) == 0
    )
    assert "rank 2 (pod r1-math-2): exit code 1: InternalError: CUDA error" in st["message"]
    assert [e.reason for e in plan.events] == ["Restarting"]
    plan = g.reconcile(at(101))  # old pods still terminating: wait, do not reuse their names
    assert plan.create_pods == [] and plan.delete_pods == [] and plan.requeue_after == 2.0
    g.gone()
    plan = g.reconcile(at(105))
    assert len(plan.create_pods) == 4 and {p.attempt for p in plan.create_pods} == {1}
    assert plan.create_pods[0].labels["kueue.x-k8s.io/pod-group-name"] == "r1-math-g1"


def test_backoff_limit_exhausted_fails_and_stops_running_pods() -> None:
    g = Gang.new()
    for i in range(3):  # backoffLimit 2: the third failure is final
        g.running(at(1000 * i))
        g.set(1, phase="Failed", exit_code=137, terminated_reason="OOMKilled")
        plan = g.reconcile(at(1000 * i + 500))
    assert g.status["phase"] == "Failed" and g.status["reason"] == "BackoffLimitExceeded"
    assert g.status["restarts"] == 2
    assert "OOMKilled: exit code 137" in g.status["message"] and "backoffLimit 2" in g.status["message"]
    assert sorted(plan.delete_pods) == [
        "r1-math-0",
        "r1-math-2",
        "r1-math-3",
    ]  # the failed pod stays for logs
    assert g.cond("Failed")["status"] == "True" and g.cond("Stalled")["status"] == "True"
    assert g.status["completionTime"] == "2025-03-01T12:41:40Z"


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"phase": "Failed", "reason": "Evicted"}, "Evicted"),
        ({"phase": "Failed", "reason": "Preempting"}, "Preempting"),
        ({"phase": "Failed", "reason": "NodeShutdown"}, "NodeShutdown"),
        ({"phase": "Running", "disruption_target": True}, "DisruptionTarget"),
        ({"phase": "Unknown"}, "NodeLost"),
        ({"phase": "Running", "deleting": True}, "deleted while running"),
    ],
)
def test_disruptions_restart_without_consuming_backoff(changes: dict[str, Any], word: str) -> None:
    g = Gang.new(runPolicy={"backoffLimit": 0})
    g.running(T0)
    g.set(3, **changes)
    g.set(0, phase="Failed", exit_code=1)  # a peer dies of the lost rank: still a disruption
    plan = g.reconcile(at(100))
    st = g.status
    assert st["phase"] == "Restarting" and st["reason"] == "Disrupted"
    assert st["disruptions"] == 1 and st.get("restarts", 0) == 0 and st["attempt"] == 1
    assert word in st["message"]
    assert plan.events[0].type == "Warning" and plan.events[0].reason == "Disrupted"


def test_a_rank_vanishing_mid_run_is_a_disruption() -> None:
    g = Gang.new()
    g.running(T0)
    del g.pods["r1-math-1"]
    g.reconcile(at(100))
    assert g.status["disruptions"] == 1 and "rank(s) 1 disappeared" in g.status["message"]


def test_non_retryable_stage_error_fails_at_once() -> None:
    g = Gang.new()
    g.running(T0)
    g.set(0, phase="Failed", exit_code=1, termination_message=result(False, reason="InvalidInput"))
    g.reconcile(at(100))
    assert g.status["phase"] == "Failed" and g.status["reason"] == "InvalidInput"
    assert g.status.get("restarts", 0) == 0


# --------------------------------------------------------------------------- startup / deadlines


@pytest.mark.parametrize(
    ("changes", "reason", "detail"),
    [
        (
            {"unschedulable": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."},
            "Unschedulable",
            "Insufficient nvidia.com/gpu",
        ),
        (
            {"waiting_reason": "ImagePullBackOff", "waiting_message": "Back-off pulling image"},
            "ImagePullBackOff",
            "Back-off pulling image",
        ),
        (
            {"waiting_reason": "CreateContainerConfigError", "waiting_message": 'secret "s3" not found'},
            "CreateContainerConfigError",
            'secret "s3" not found',
        ),
        ({}, "StartupTimeout", "pending: r1-math-2"),
    ],
)
def test_startup_deadline_names_the_cause(changes: dict[str, Any], reason: str, detail: str) -> None:
    g = Gang.new()
    g.reconcile(T0)
    for rank in (0, 1, 3):
        g.set(rank, phase="Running")
    g.set(2, **changes)
    plan = g.reconcile(at(299))
    assert g.status["phase"] == "Pending" and plan.requeue_after == pytest.approx(1.0)
    plan = g.reconcile(at(300))
    st = g.status
    assert st["phase"] == "Failed" and st["reason"] == reason
    assert detail in st["message"] and "startupDeadlineSeconds=300" in st["message"]
    assert sorted(plan.delete_pods) == ["r1-math-0", "r1-math-1", "r1-math-2", "r1-math-3"]


def test_active_deadline() -> None:
    g = Gang.new(runPolicy={"activeDeadlineSeconds": 3600})
    g.running(T0)
    g.reconcile(at(3599))
    assert g.status["phase"] == "Running"
    plan = g.reconcile(at(3600))
    assert g.status["phase"] == "Failed" and g.status["reason"] == "DeadlineExceeded"
    assert len(plan.delete_pods) == 4


def test_finishing_late_is_still_success() -> None:
    g = Gang.new(runPolicy={"activeDeadlineSeconds": 3600})
    g.running(T0)
    g.all(phase="Succeeded", exit_code=0)
    g.reconcile(at(4000))
    assert g.status["phase"] == "Succeeded"


# --------------------------------------------------------------------------- suspend


def test_suspend_keeps_progress_and_resume_starts_a_new_attempt() -> None:
    g = Gang.new()
    g.running(T0)
    g.set(0, progress=Progress(step=120, total_steps=400))
    g.reconcile(at(10))
    g.edit(runPolicy={"suspend": True})
    plan = g.reconcile(at(20))
    assert len(plan.delete_pods) == 4 and plan.create_pods == []
    st = g.status
    assert st["phase"] == "Suspended" and st["progress"]["step"] == 120 and st["attempt"] == 1
    assert st.get("restarts", 0) == 0 and st.get("disruptions", 0) == 0
    assert g.cond("Suspended")["status"] == "True"
    assert g.reconcile(at(30)).create_pods == []
    g.edit(runPolicy={"suspend": False})
    plan = g.reconcile(at(1000))
    assert len(plan.create_pods) == 4 and plan.create_pods[0].attempt == 1
    assert g.status["startTime"] == "2025-03-01T12:16:40Z"
    assert any(e.reason == "Resumed" for e in plan.events)


# --------------------------------------------------------------------------- success / sticky


def test_all_pods_succeeded() -> None:
    g = Gang.new(runPolicy={"ttlSecondsAfterFinished": 600})
    g.running(T0)
    g.set(0, progress=Progress(step=390, total_steps=400))
    g.all(phase="Succeeded", exit_code=0)
    g.set(0, termination_message=result(True))
    plan = g.reconcile(at(100))
    st = g.status
    assert st["phase"] == "Succeeded" and st["outputUri"] == "s3://runs/r1/branches/math/f/model"
    assert st["progress"]["step"] == 400
    assert g.cond("Ready")["status"] == "True"
    assert plan.requeue_after == 600.0 and plan.delete_pods == []
    plan = g.reconcile(at(700))
    assert len(plan.delete_pods) == 4 and plan.delete_service


def test_success_without_a_progress_read_takes_progress_from_the_result() -> None:
    """A run shorter than the progress interval still shows where it ended."""
    g = Gang.new()
    g.running(T0)
    g.all(phase="Succeeded", exit_code=0)
    done = StageResult(kind="SFT", status="Succeeded", fingerprint="f", output="s3://runs/r1/branches/math/f/model",
                       metrics={"steps": 60.0, "final_loss": 0.25, "tokens_per_second": float("nan")})  # fmt: skip
    g.set(0, termination_message=done.to_json())
    g.reconcile(at(30))
    progress = g.status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["loss"], progress["etaSeconds"]) == (
        60,
        60,
        0.25,
        0.0,
    )
    assert progress.get("tokensPerSecond") is None  # not a number: left out, never NaN in a status


def test_succeeded_is_sticky_and_survives_non_semantic_edits() -> None:
    g = Gang.new()
    g.running(T0)
    g.all(phase="Succeeded", exit_code=0)
    g.reconcile(at(100))
    g.pods.clear()
    assert g.reconcile(at(200)).create_pods == []
    g.edit(resources={"cpu": 32})
    plan = g.reconcile(at(300))
    assert plan.create_pods == [] and g.status["phase"] == "Succeeded" and g.status["observedGeneration"] == 2


def test_failed_is_sticky_until_the_spec_changes() -> None:
    g = Gang.new(runPolicy={"backoffLimit": 0})
    g.running(T0)
    g.set(0, phase="Failed", exit_code=1)
    g.reconcile(at(10))
    assert g.status["phase"] == "Failed"
    assert list(g.pods) == ["r1-math-0"]  # the failed pod is kept for `kubectl logs`
    plan = g.reconcile(at(20))
    assert plan.create_pods == [] and plan.delete_pods == [] and plan.events == []
    g.edit(runPolicy={"backoffLimit": 1})
    plan = g.reconcile(at(30))  # a retry with a fresh budget: clear the old attempt first
    assert plan.delete_pods == ["r1-math-0"] and plan.create_pods == []
    plan = g.reconcile(at(31))
    assert len(plan.create_pods) == 4 and plan.create_pods[0].attempt == 1
    assert g.status["phase"] == "Pending" and g.status.get("restarts", 0) == 0
    assert "completionTime" not in g.status


def test_changed_training_replaces_the_running_gang() -> None:
    g = Gang.new()
    g.running(T0)
    old = g.status["fingerprint"]
    g.edit(training={"globalBatchSize": 64})
    plan = g.reconcile(at(50))
    assert len(plan.delete_pods) == 4 and plan.create_pods == []
    assert g.status["fingerprint"] != old and g.status["attempt"] == 1
    plan = g.reconcile(at(51))
    assert (
        len(plan.create_pods) == 4
        and plan.create_pods[0].labels[LABEL_FINGERPRINT] == g.status["fingerprint"]
    )


# --------------------------------------------------------------------------- invalid / parsing


def test_invalid_branchjob_stalls() -> None:
    g = Gang.new(training={"globalBatchSize": 30})
    plan = g.reconcile(T0)
    assert plan.create_pods == [] and plan.delete_pods == []
    assert g.cond("Stalled")["status"] == "True"
    assert g.cond("Stalled")["message"].startswith("spec.training.globalBatchSize: 30 is not divisible")


def test_observed_pod_from_object() -> None:
    pod = {
        "metadata": {
            "name": "r1-math-1",
            "creationTimestamp": "2025-03-01T12:00:00Z",
            "labels": {LABEL_RANK: "1", LABEL_ATTEMPT: "3", LABEL_FINGERPRINT: "fp"},
        },
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "startTime": "2025-03-01T12:00:05Z",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"},
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": 137, "reason": "Error", "message": result(False)}},
                }
            ],
        },
    }
    obs = ObservedPod.from_object(pod)
    assert (obs.rank, obs.attempt, obs.phase, obs.reason, obs.exit_code) == (1, 3, "Failed", "Evicted", 137)
    assert obs.disruption_target and obs.disrupted and obs.created == T0 and obs.fingerprint == "fp"
    assert obs.started == at(5)
    assert obs.result is not None and obs.result.error is not None
    pending = ObservedPod.from_object(
        {
            "metadata": {"name": "x-0"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes",
                    }
                ],
                "containerStatuses": [
                    {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}
                ],
            },
        }
    )
    assert pending.unschedulable == "0/3 nodes" and pending.waiting_reason == "ImagePullBackOff"
    assert not pending.disrupted
    assert (
        ObservedPod.from_object({"metadata": {"name": "y-0"}, "status": {"phase": "Bogus"}}).phase
        == "Unknown"
    )


# --------------------------------------------------------------------------- decision table

ALL = (0, 1, 2, 3)
GANG_TABLE: list[tuple[str, dict[int, dict[str, Any]], int, str, str, int, int]] = [
    # (state, pod changes by rank after creation, restarts so far, phase, reason, creates, deletes)
    ("just created", {}, 0, "Pending", "Starting", 0, 0),
    ("some running", {0: {"phase": "Running"}, 1: {"phase": "Running"}}, 0, "Pending", "Starting", 0, 0),
    ("all running", {r: {"phase": "Running"} for r in ALL}, 0, "Running", "Running", 0, 0),
    (
        "rank exits 1",
        {**{r: {"phase": "Running"} for r in ALL}, 2: {"phase": "Failed", "exit_code": 1}},
        0,
        "Restarting",
        "Restarting",
        0,
        4,
    ),
    (
        "rank exits 1 at limit",
        {**{r: {"phase": "Running"} for r in ALL}, 2: {"phase": "Failed", "exit_code": 1}},
        2,
        "Failed",
        "BackoffLimitExceeded",
        0,
        3,
    ),
    (
        "rank evicted at limit",
        {**{r: {"phase": "Running"} for r in ALL}, 2: {"phase": "Failed", "reason": "Evicted"}},
        2,
        "Restarting",
        "Disrupted",
        0,
        4,
    ),
    (
        "node lost",
        {**{r: {"phase": "Running"} for r in ALL}, 1: {"phase": "Unknown"}},
        0,
        "Restarting",
        "Disrupted",
        0,
        4,
    ),
    (
        "all succeeded",
        {r: {"phase": "Succeeded", "exit_code": 0} for r in ALL},
        0,
        "Succeeded",
        "Succeeded",
        0,
        0,
    ),
    (
        "rank 0 done, others running",
        {
            0: {"phase": "Succeeded"},
            1: {"phase": "Running"},
            2: {"phase": "Running"},
            3: {"phase": "Running"},
        },
        0,
        "Running",
        "Running",
        0,
        0,
    ),
]


@pytest.mark.parametrize(
    ("state", "pods", "restarts", "phase", "reason", "creates", "deletes"),
    GANG_TABLE,
    ids=[r[0] for r in GANG_TABLE],
)
def test_gang_decision_table(
    state: str,
    pods: dict[int, dict[str, Any]],
    restarts: int,
    phase: str,
    reason: str,
    creates: int,
    deletes: int,
) -> None:
    g = Gang.new()
    g.reconcile(T0)
    g.obj["status"]["restarts"] = restarts
    for rank, changes in pods.items():
        g.set(rank, **changes)
    plan = g.reconcile(at(10))
    assert (g.status["phase"], g.status["reason"]) == (phase, reason)
    assert (len(plan.create_pods), len(plan.delete_pods)) == (creates, deletes)
    running = g.cond("Running")["status"]
    assert running == ("True" if phase == "Running" else "False")

"""plan_distillation, driven through whole pipelines by a tiny fake cluster.

The fake applies a Plan the way the kopf handlers will (delete, create, patch, write the
status) and lets a test move children along (a branch runs, a Job completes). Scenarios
follow the issue's list: first reconcile, progress, a failed branch, all done -> merge,
merge -> eval, eval -> Succeeded, spec changes, suspend/resume, deadline, invalid spec,
sticky terminal states, TTL.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from branchmerge_operator.api import BranchJob, Distillation, parse_manifest
from branchmerge_operator.conditions import DISTILLATION_TYPES
from branchmerge_operator.naming import LABEL_BRANCH, LABEL_FINGERPRINT
from branchmerge_operator.pipeline import (
    Observed,
    ObservedBranchJob,
    ObservedJob,
    Plan,
    StageJob,
    headline,
    parse_result,
    plan_distillation,
)
from branchmerge_trainer.stages import Progress, Score, StageError, StageResult

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


MANIFEST: dict[str, Any] = {
    "apiVersion": "branchmerge.io/v1alpha1",
    "kind": "Distillation",
    "metadata": {"name": "r1", "namespace": "ml", "generation": 1, "uid": "u-1"},
    "spec": {
        "student": {"uri": "s3://models/student"},
        "output": {"uri": "s3://runs/r1", "credentialsSecret": "s3"},
        "branches": [
            {"name": n, "datasets": [{"uri": f"s3://data/{n}.jsonl"}], "training": {"globalBatchSize": 8}}
            for n in ("math", "science", "code")
        ],
        "merge": {"steps": [{"base": "science", "other": "math"}, {"base": "code", "other": "previous"}]},
        "eval": {"benchmarks": [{"name": "aime2024", "kind": "math", "preset": "aime2024", "uri": "s3://e/a.jsonl"}]},
        "queueName": "gpu",
    },
}


def scores(value: float = 0.781) -> list[Score]:
    return [
        Score(model="merged", benchmark="aime2024", score=value, samples=480),
        Score(model="student", benchmark="aime2024", score=0.726, samples=480),
    ]


@dataclass
class Cluster:
    """Children as the API server would hold them, plus the Distillation object."""

    obj: dict[str, Any]
    bjs: dict[str, ObservedBranchJob] = field(default_factory=dict)
    jobs: dict[str, ObservedJob] = field(default_factory=dict)
    instant_delete: bool = True
    plans: list[Plan] = field(default_factory=list)

    @classmethod
    def new(cls, mutate: Callable[[dict[str, Any]], Any] | None = None, **kw: Any) -> Cluster:
        obj = copy.deepcopy(MANIFEST)
        if mutate is not None:
            mutate(obj)
        return cls(obj, **kw)

    @property
    def status(self) -> dict[str, Any]:
        return self.obj.get("status") or {}

    def cond(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)

    def observed(self) -> Observed:
        return Observed(branch_jobs=list(self.bjs.values()), jobs=list(self.jobs.values()))

    def reconcile(self, now: datetime) -> Plan:
        plan = plan_distillation(self.obj, self.observed(), now)
        for ref in plan.delete:
            table: dict[str, Any] = self.bjs if ref.kind == "BranchJob" else self.jobs
            assert ref.name in table, f"deleting {ref} that does not exist"
            if self.instant_delete:
                del table[ref.name]
            else:
                table[ref.name] = replace(table[ref.name], deleting=True)
        for child in plan.create:
            if isinstance(child, BranchJob):
                name = child.metadata.name
                assert name not in self.bjs, f"{name} created twice"
                self.bjs[name] = ObservedBranchJob(
                    name=name,
                    branch=child.metadata.labels[LABEL_BRANCH],
                    fingerprint=child.metadata.labels[LABEL_FINGERPRINT],
                    suspended=child.spec.run_policy.suspend,
                )
            else:
                assert child.name not in self.jobs, f"{child.name} created twice"
                self.jobs[child.name] = ObservedJob(child.name, child.role, child.stage.fingerprint)
        for patch in plan.patch:
            self.bjs[patch.name] = replace(self.bjs[patch.name], suspended=patch.patch["spec"]["runPolicy"]["suspend"])
        self.obj["status"] = plan.status.dump()
        self.plans.append(plan)
        return plan

    def gone(self) -> Cluster:
        """Children marked for deletion finish disappearing."""
        self.bjs = {k: v for k, v in self.bjs.items() if not v.deleting}
        self.jobs = {k: v for k, v in self.jobs.items() if not v.deleting}
        return self

    def branch(self, name: str, **changes: Any) -> Cluster:
        key = f"r1-{name}"
        self.bjs[key] = replace(self.bjs[key], **changes)
        return self

    def succeed_branches(self, *names: str) -> Cluster:
        for name in names or ("math", "science", "code"):
            bj = self.bjs[f"r1-{name}"]
            self.branch(name, phase="Succeeded", output_uri=f"s3://runs/r1/branches/{name}/{bj.fingerprint}/model")
        return self

    def job(self, role: str) -> ObservedJob:
        [job] = [j for j in self.jobs.values() if j.stage == role and not j.deleting]
        return job

    def finish(self, role: str, ok: bool = True, result: StageResult | None = None) -> Cluster:
        job = self.job(role)
        if result is None:
            kind = "Merge" if role == "merge" else "Eval"
            output = f"s3://runs/r1/{role}/{job.fingerprint}/{'model' if role == 'merge' else 'results'}"
            result = StageResult(
                kind=kind,
                status="Succeeded" if ok else "Failed",
                fingerprint=job.fingerprint or "",
                output=output if ok else None,
                scores=scores() if ok and role == "eval" else [],
                error=None if ok else StageError(reason="OutOfMemory", message="killed while fusing layer 12"),
            )
        self.jobs[job.name] = replace(job, phase="Succeeded" if ok else "Failed", result=result)
        return self

    def edit(self, mutate: Callable[[dict[str, Any]], Any]) -> Cluster:
        mutate(self.obj["spec"])
        self.obj["metadata"]["generation"] += 1
        return self

    def run_to_success(self, start: float = 0) -> None:
        self.reconcile(at(start))
        self.succeed_branches()
        self.reconcile(at(start + 100))
        self.finish("merge")
        self.reconcile(at(start + 200))
        self.finish("eval")
        self.reconcile(at(start + 300))
        assert self.status["phase"] == "Succeeded"


def no_empty_strings(value: Any) -> bool:
    text = json.dumps(value)
    return '""' not in text


# --------------------------------------------------------------------------- first reconcile


def test_first_reconcile_creates_every_branch_and_sets_all_conditions() -> None:
    c = Cluster.new()
    plan = c.reconcile(T0)
    assert sorted(bj.metadata.name for bj in plan.create if isinstance(bj, BranchJob)) == ["r1-code", "r1-math", "r1-science"]
    assert [bj.metadata.name for bj in plan.branch_jobs] == ["r1-math", "r1-science", "r1-code"]
    assert plan.delete == [] and plan.jobs == []
    st = c.status
    assert st["phase"] == "Pending" and st["observedGeneration"] == 1 and st["startTime"] == "2025-03-01T12:00:00Z"
    assert [cond["type"] for cond in st["conditions"]] == list(DISTILLATION_TYPES)
    for cond in st["conditions"]:
        assert cond["observedGeneration"] == 1 and cond["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert c.cond("Ready")["status"] == "False" and c.cond("Reconciling")["status"] == "True"
    assert c.cond("Stalled")["status"] == "False" and c.cond("Succeeded")["status"] == "Unknown"
    assert st["branchesSucceeded"] == "0/3"
    assert [e.reason for e in plan.events] == ["Created"] * 3
    assert plan.requeue_after == 60.0
    assert no_empty_strings(plan.status_patch())
    bj = next(b for b in plan.create if isinstance(b, BranchJob))
    assert bj.metadata.namespace == "ml"
    assert bj.spec.queue_name == "gpu" and bj.spec.output.credentials_secret == "s3"
    assert bj.spec.run_policy.active_deadline_seconds is None


def test_reconcile_is_idempotent_and_keeps_transition_times() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    plan = c.reconcile(at(30))
    assert plan.create == [] and plan.delete == [] and plan.events == []
    assert all(cond["lastTransitionTime"] == "2025-03-01T12:00:00Z" for cond in c.status["conditions"])


def test_branch_progress_is_reported() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("math", phase="Running", progress=Progress(step=50, total_steps=200, loss=0.9), restarts=1)
    c.reconcile(at(60))
    math = c.status["branches"][0]
    assert (math["phase"], math["progress"], math["step"], math["totalSteps"], math["restarts"]) == (
        "Running", 25.0, 50, 200, 1)
    assert c.status["phase"] == "Running"
    ready = c.cond("Ready")
    assert ready["reason"] == "BranchesRunning" and ready["lastTransitionTime"] == "2025-03-01T12:00:00Z"


# --------------------------------------------------------------------------- failure


def test_failed_branch_fails_the_distillation_and_stops_the_rest() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("math", phase="Running")
    c.branch("code", phase="Succeeded")
    c.branch("science", phase="Failed", reason="BackoffLimitExceeded", message="rank 1 exit code 1")
    plan = c.reconcile(at(500))
    st = c.status
    assert st["phase"] == "Failed" and st["completionTime"] == "2025-03-01T12:08:20Z"
    assert {(r.kind, r.name) for r in plan.delete} == {("BranchJob", "r1-math")}
    assert plan.create == []
    failed = c.cond("Failed")
    assert failed["status"] == "True" and failed["reason"] == "BranchFailed"
    assert "branch science failed: BackoffLimitExceeded: rank 1 exit code 1" in failed["message"]
    assert c.cond("Stalled")["status"] == "True" and c.cond("Ready")["status"] == "False"
    assert c.cond("Reconciling")["status"] == "False"
    assert {e.reason for e in plan.events} >= {"BranchFailed", "Deleted"}
    assert any(e.type == "Warning" and e.reason == "BranchFailed" for e in plan.events)
    assert plan.requeue_after is None


def test_failed_is_sticky_even_when_children_disappear() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("science", phase="Failed", message="boom")
    c.reconcile(at(10))
    before = copy.deepcopy(c.status)
    c.bjs.clear()
    plan = c.reconcile(at(20))
    assert plan.create == [] and plan.delete == [] and plan.events == []
    assert c.status == before


def test_merge_failure_fails_with_the_stage_error() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(10))
    c.finish("merge", ok=False)
    plan = c.reconcile(at(20))
    assert c.status["phase"] == "Failed"
    assert c.cond("Failed")["reason"] == "MergeFailed"
    assert "OutOfMemory: killed while fusing layer 12" in c.cond("Failed")["message"]
    assert c.status["merge"]["phase"] == "Failed"
    assert not [j for j in c.jobs.values() if j.stage == "eval"]
    assert any(e.reason == "MergeFailed" for e in plan.events)


def test_spec_change_retries_failed_stages_with_a_fresh_child() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches("math", "code")
    c.branch("science", phase="Failed", message="node broke")
    c.reconcile(at(10))
    assert c.status["phase"] == "Failed"
    c.edit(lambda s: s["eval"]["benchmarks"][0].update(samples=2))  # unrelated change
    plan = c.reconcile(at(20))
    assert [(r.kind, r.name) for r in plan.delete] == [("BranchJob", "r1-science")]
    assert c.status["phase"] == "Running" and "completionTime" not in c.status
    plan = c.reconcile(at(25))
    assert [b.metadata.name for b in plan.create if isinstance(b, BranchJob)] == ["r1-science"]
    assert c.bjs["r1-science"].phase is None


# --------------------------------------------------------------------------- happy path


def test_all_branches_done_starts_the_merge() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches()
    plan = c.reconcile(at(100))
    [job] = plan.create
    assert isinstance(job, StageJob)
    assert job.role == "merge" and job.name == f"r1-merge-{job.stage.fingerprint[:8]}"
    assert job.labels["branchmerge.io/stage"] == "merge" and job.labels["kueue.x-k8s.io/queue-name"] == "gpu"
    assert job.stage.models["math"].uri == c.bjs["r1-math"].output_uri
    assert job.output.credentials_secret == "s3" and job.backoff_limit == 3
    assert job.command == ["branchmerge-train", "merge", "--config"]
    st = c.status
    assert st["phase"] == "Merging" and st["branchesSucceeded"] == "3/3"
    assert st["merge"]["phase"] == "Running" and st["merge"]["jobName"] == job.name
    assert c.cond("BranchesSucceeded")["status"] == "True"
    assert {e.reason for e in plan.events} >= {"BranchSucceeded", "Created"}


def test_merge_done_starts_eval_then_scores_land_on_the_status() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(100))
    merge_job = c.job("merge")
    c.finish("merge")
    plan = c.reconcile(at(200))
    [job] = plan.create
    assert isinstance(job, StageJob) and job.role == "eval"
    merged = f"s3://runs/r1/merge/{merge_job.fingerprint}/model"
    assert job.stage.models["merged"].uri == merged
    assert c.status["phase"] == "Evaluating" and c.status["mergedModel"] == merged
    assert c.cond("Merged")["status"] == "True"
    c.finish("eval")
    plan = c.reconcile(at(300))
    st = c.status
    assert st["phase"] == "Succeeded" and st["completionTime"] == "2025-03-01T12:05:00Z"
    assert st["headline"] == "aime2024=78.1"
    assert [r["model"] for r in st["evaluation"]["results"]] == ["merged", "student"]
    assert c.cond("Ready")["status"] == "True" and c.cond("Succeeded")["status"] == "True"
    assert c.cond("Reconciling")["status"] == "False" and c.cond("Evaluated")["status"] == "True"
    assert {e.reason for e in plan.events} >= {"EvaluationSucceeded", "Succeeded"}
    assert plan.create == [] and plan.delete == []


def test_succeeded_is_sticky_and_creates_nothing_after_children_are_gone() -> None:
    c = Cluster.new()
    c.run_to_success()
    before = copy.deepcopy(c.status)
    c.bjs.clear()
    c.jobs.clear()
    plan = c.reconcile(at(1000))
    assert plan.create == [] and plan.delete == [] and plan.requeue_after is None
    assert c.status == before


def test_without_eval_the_merge_finishes_the_pipeline() -> None:
    c = Cluster.new(lambda o: o["spec"].pop("eval"))
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(10))
    c.finish("merge")
    c.reconcile(at(20))
    assert c.status["phase"] == "Succeeded"
    assert c.cond("Evaluated")["reason"] == "NotRequested" and c.cond("Evaluated")["status"] == "True"
    assert c.status["evaluation"]["phase"] == "Skipped"


# --------------------------------------------------------------------------- spec changes


def test_branch_change_mid_run_redoes_only_that_branch() -> None:
    c = Cluster.new(instant_delete=False)
    c.reconcile(T0)
    for n in ("math", "science", "code"):
        c.branch(n, phase="Running")
    old_math = c.bjs["r1-math"].fingerprint
    c.edit(lambda s: s["branches"][0]["training"].update(learningRate=2e-5))
    plan = c.reconcile(at(10))
    assert [(r.kind, r.name) for r in plan.delete] == [("BranchJob", "r1-math")]
    assert plan.create == [] and plan.requeue_after == 5.0
    spec_changed = [e for e in plan.events if e.reason == "SpecChanged"]
    assert spec_changed and "math, merge, eval" in spec_changed[0].message
    assert c.status["observedGeneration"] == 2
    plan = c.reconcile(at(12))  # still terminating: no duplicate delete, no create
    assert plan.delete == [] and plan.create == []
    c.gone()
    plan = c.reconcile(at(20))
    [bj] = plan.create
    assert isinstance(bj, BranchJob) and bj.metadata.name == "r1-math"
    assert c.bjs["r1-math"].fingerprint != old_math
    assert c.bjs["r1-science"].phase == "Running" and c.bjs["r1-code"].phase == "Running"


def test_stale_merge_job_is_deleted_when_a_branch_changes() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(10))
    merge = c.job("merge")
    c.edit(lambda s: s["branches"][2]["datasets"].append({"uri": "s3://data/code-more.jsonl"}))
    plan = c.reconcile(at(20))
    assert {(r.kind, r.name) for r in plan.delete} == {("Job", merge.name), ("BranchJob", "r1-code")}
    assert c.status["phase"] == "Running"


def test_eval_change_after_success_reruns_only_eval() -> None:
    c = Cluster.new()
    c.run_to_success()
    old_eval = c.job("eval")
    c.edit(lambda s: s["eval"]["benchmarks"][0].update(samples=32))
    plan = c.reconcile(at(400))
    assert [(r.kind, r.name) for r in plan.delete] == [("Job", old_eval.name)]
    [job] = plan.create
    assert isinstance(job, StageJob) and job.role == "eval" and job.name != old_eval.name
    assert c.status["phase"] == "Evaluating" and "completionTime" not in c.status
    assert c.status["evaluation"]["results"] == [] and "headline" not in c.status


def test_finished_stages_are_remembered_after_ttl_removed_their_children() -> None:
    c = Cluster.new(lambda o: o["spec"].setdefault("runPolicy", {}).update(ttlSecondsAfterFinished=60))
    c.run_to_success()
    plan = c.reconcile(at(310))
    assert plan.delete == [] and plan.requeue_after == pytest.approx(50.0)
    children = {"r1-math", "r1-science", "r1-code", c.job("merge").name, c.job("eval").name}
    plan = c.reconcile(at(400))
    assert {r.name for r in plan.delete} == children
    assert any(e.reason == "TTLExpired" for e in plan.events)
    assert not c.bjs and not c.jobs
    assert c.reconcile(at(500)).delete == []
    # An eval-only change now re-runs the eval alone: branches and merge are remembered.
    c.edit(lambda s: s["eval"]["benchmarks"][0].update(samples=8))
    plan = c.reconcile(at(600))
    assert [type(x).__name__ for x in plan.create] == ["StageJob"]
    assert plan.create[0].role == "eval"  # type: ignore[union-attr]
    assert c.status["branchesSucceeded"] == "3/3" and c.status["merge"]["phase"] == "Succeeded"


def test_removed_branch_is_deleted() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.edit(lambda s: (s["branches"].pop(), s["merge"]["steps"].pop()))
    plan = c.reconcile(at(10))
    assert [(r.name, r.reason) for r in plan.delete] == [("r1-code", "its branch was removed from the spec")]
    assert c.status["branchesSucceeded"] == "0/2"


def test_resource_change_does_not_restart_anything() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("math", phase="Running")
    c.edit(lambda s: s["branches"][0].update(resources={"cpu": 16, "memory": "64Gi"}))
    plan = c.reconcile(at(10))
    assert plan.delete == [] and plan.create == []
    assert plan.branch_jobs[0].spec.resources.cpu == "16"


def test_externally_deleted_children() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches("math")
    c.reconcile(at(10))
    del c.bjs["r1-math"]  # finished: remembered, not re-created
    del c.bjs["r1-code"]  # never finished: re-created
    plan = c.reconcile(at(20))
    assert [b.metadata.name for b in plan.create if isinstance(b, BranchJob)] == ["r1-code"]
    assert c.status["branches"][0]["phase"] == "Succeeded"


# --------------------------------------------------------------------------- suspend / deadline


def test_suspend_and_resume_branches() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("math", phase="Running", progress=Progress(step=10, total_steps=100))
    c.edit(lambda s: s.setdefault("runPolicy", {}).update(suspend=True))
    plan = c.reconcile(at(50))
    assert sorted(p.name for p in plan.patch) == ["r1-code", "r1-math", "r1-science"]
    assert all(p.patch == {"spec": {"runPolicy": {"suspend": True}}} for p in plan.patch)
    assert plan.create == [] and plan.delete == [] and plan.requeue_after is None
    assert c.status["phase"] == "Suspended"
    assert c.cond("Suspended")["status"] == "True" and c.cond("Reconciling")["status"] == "False"
    assert any(e.reason == "Suspended" for e in plan.events)
    c.branch("math", phase="Suspended")
    c.edit(lambda s: s["runPolicy"].update(suspend=False))
    plan = c.reconcile(at(500))
    assert all(p.patch == {"spec": {"runPolicy": {"suspend": False}}} for p in plan.patch) and len(plan.patch) == 3
    assert c.status["startTime"] == "2025-03-01T12:08:20Z"  # the deadline clock restarts
    assert any(e.reason == "Resumed" for e in plan.events)


def test_suspend_deletes_active_merge_and_resume_recreates_it() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(10))
    job = c.job("merge")
    c.edit(lambda s: s.setdefault("runPolicy", {}).update(suspend=True))
    plan = c.reconcile(at(20))
    assert [(r.kind, r.name) for r in plan.delete] == [("Job", job.name)]
    assert c.status["phase"] == "Suspended" and c.status["merge"]["phase"] == "Waiting"
    assert c.reconcile(at(30)).create == []
    c.edit(lambda s: s["runPolicy"].update(suspend=False))
    plan = c.reconcile(at(40))
    assert [x.name for x in plan.create if isinstance(x, StageJob)] == [job.name]
    assert c.status["phase"] == "Merging"


def test_suspended_from_the_start_creates_nothing() -> None:
    c = Cluster.new(lambda o: o["spec"].setdefault("runPolicy", {}).update(suspend=True))
    plan = c.reconcile(T0)
    assert plan.create == [] and c.status["phase"] == "Suspended"
    assert "startTime" not in c.status


def test_deadline_exceeded_fails_and_stops_children() -> None:
    c = Cluster.new(lambda o: o["spec"].setdefault("runPolicy", {}).update(activeDeadlineSeconds=100))
    plan = c.reconcile(T0)
    assert plan.requeue_after == 60.0
    c.branch("math", phase="Running")
    plan = c.reconcile(at(70))
    assert plan.requeue_after == pytest.approx(30.0)
    plan = c.reconcile(at(101))
    assert c.status["phase"] == "Failed" and c.cond("Failed")["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=100" in c.cond("Ready")["message"]
    assert len(plan.delete) == 3 and plan.create == []


def test_work_that_finished_is_not_failed_by_the_deadline() -> None:
    c = Cluster.new(lambda o: o["spec"].setdefault("runPolicy", {}).update(activeDeadlineSeconds=250))
    c.run_to_success()  # the last reconcile happens at t=300, after the deadline
    assert c.status["phase"] == "Succeeded"


def test_suspended_time_does_not_count_against_the_deadline() -> None:
    c = Cluster.new(lambda o: o["spec"].setdefault("runPolicy", {}).update(activeDeadlineSeconds=100))
    c.reconcile(T0)
    c.edit(lambda s: s["runPolicy"].update(suspend=True))
    c.reconcile(at(50))
    c.reconcile(at(400))
    assert c.status["phase"] == "Suspended"
    c.edit(lambda s: s["runPolicy"].update(suspend=False))
    c.reconcile(at(500))
    c.reconcile(at(550))
    assert c.status["phase"] != "Failed"
    c.reconcile(at(601))
    assert c.status["phase"] == "Failed"


# --------------------------------------------------------------------------- invalid spec


def test_invalid_spec_stalls_without_touching_children() -> None:
    c = Cluster.new()
    c.reconcile(T0)
    c.branch("math", phase="Running")
    c.edit(lambda s: s["merge"]["steps"][0].update(base="sciense"))
    plan = c.reconcile(at(10))
    assert plan.create == [] and plan.delete == [] and plan.patch == []
    stalled = c.cond("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert stalled["message"].startswith("spec.merge.steps[0].base: 'sciense' is not a branch")
    assert "did you mean 'science'" in stalled["message"]
    assert c.status["observedGeneration"] == 2 and c.status["phase"] == "Pending"
    assert [e.reason for e in plan.events] == ["InvalidSpec"]
    assert c.reconcile(at(20)).events == []  # reported once
    c.edit(lambda s: s["merge"]["steps"][0].update(base="science"))
    c.reconcile(at(30))
    assert c.cond("Stalled")["status"] == "False" and c.status["phase"] == "Running"


def test_invalid_first_spec_sets_every_standard_condition() -> None:
    c = Cluster.new(lambda o: o["spec"]["branches"][1].update(name="math"))
    plan = c.reconcile(T0)
    types = {cond["type"] for cond in c.status["conditions"]}
    assert {"Ready", "Stalled", "Reconciling", "Succeeded", "Failed"} <= types
    assert "spec.branches[1].name: duplicate branch name 'math'" in c.cond("Ready")["message"]
    assert plan.requeue_after is None


def test_unknown_fields_reaching_the_operator_are_reported() -> None:
    c = Cluster.new(lambda o: o["spec"].update(brnches=[]))
    c.reconcile(T0)
    assert "spec.brnches: unknown field" in c.cond("Stalled")["message"]


def test_accepts_a_parsed_model_too() -> None:
    dist = parse_manifest(MANIFEST)
    assert isinstance(dist, Distillation)
    plan = plan_distillation(dist, Observed(), T0)
    assert len(plan.create) == 3


# --------------------------------------------------------------------------- observation helpers


def test_observed_branchjob_from_object() -> None:
    obj = {
        "metadata": {"name": "r1-math", "labels": {LABEL_BRANCH: "math", LABEL_FINGERPRINT: "abc"},
                     "deletionTimestamp": "2025-03-01T12:00:00Z"},
        "spec": {"runPolicy": {"suspend": True}},
        "status": {"phase": "Running", "restarts": 2, "progress": {"step": 3, "totalSteps": 9}, "outputUri": None},
    }
    obs = ObservedBranchJob.from_object(obj)
    assert (obs.name, obs.branch, obs.fingerprint, obs.phase, obs.restarts) == ("r1-math", "math", "abc", "Running", 2)
    assert obs.suspended and obs.deleting and obs.progress == Progress(step=3, total_steps=9)
    assert ObservedBranchJob.from_object({"metadata": {"name": "x"}, "status": {"phase": "Weird"}}).phase is None


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], "Active"),
        ([{"type": "Complete", "status": "True"}], "Succeeded"),
        ([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], "Failed"),
        ([{"type": "Failed", "status": "False"}], "Active"),
    ],
)
def test_observed_job_from_object(conditions: list[dict[str, str]], phase: str) -> None:
    job = {"metadata": {"name": "r1-eval-1", "labels": {"branchmerge.io/stage": "eval", LABEL_FINGERPRINT: "f"}},
           "status": {"conditions": conditions}}
    result = StageResult(kind="Eval", status="Succeeded", fingerprint="f", scores=scores()).to_json()
    obs = ObservedJob.from_object(job, result)
    assert obs.phase == phase and obs.stage == "eval" and obs.result is not None and len(obs.result.scores) == 2


def test_parse_result_tolerates_garbage_and_log_prefix() -> None:
    ok = StageResult(kind="Merge", status="Succeeded", fingerprint="f", output="s3://x/y").to_json()
    assert parse_result(ok) == parse_result("BRANCHMERGE_RESULT " + ok) != None  # noqa: E711
    assert parse_result("Error: OOMKilled") is None and parse_result(None) is None


def test_headline() -> None:
    assert headline([]) is None
    assert headline(scores()) == "aime2024=78.1"
    only_student = [Score(model="student", benchmark="gpqa", score=0.5, samples=4)]
    assert headline(only_student) == "gpqa=50.0"


# --------------------------------------------------------------------------- decision table


def _eval_failed(c: Cluster) -> None:
    c.reconcile(T0)
    c.succeed_branches()
    c.reconcile(at(1))
    c.finish("merge")
    c.reconcile(at(2))
    c.finish("eval", ok=False)


TABLE: list[tuple[str, Callable[[Cluster], Any], str, str, str, int]] = [
    # (state, how to get there, phase, Ready status/reason, Reconciling, creates on the next reconcile)
    ("fresh", lambda c: None, "Pending", "False/Pending", "True", 3),
    ("branch running", lambda c: (c.reconcile(T0), c.branch("math", phase="Running")), "Running",
     "False/BranchesRunning", "True", 0),
    ("branch restarting", lambda c: (c.reconcile(T0), c.branch("code", phase="Restarting")), "Running",
     "False/BranchesRunning", "True", 0),
    ("branches pending", lambda c: c.reconcile(T0), "Pending", "False/Pending", "True", 0),
    ("one branch done", lambda c: (c.reconcile(T0), c.succeed_branches("math")), "Running",
     "False/BranchesRunning", "True", 0),
    ("all branches done", lambda c: (c.reconcile(T0), c.succeed_branches()), "Merging", "False/Merging", "True", 1),
    ("merge running", lambda c: (c.reconcile(T0), c.succeed_branches(), c.reconcile(at(1))), "Merging",
     "False/Merging", "True", 0),
    ("merge done", lambda c: (c.reconcile(T0), c.succeed_branches(), c.reconcile(at(1)), c.finish("merge")),
     "Evaluating", "False/Evaluating", "True", 1),
    ("eval done", lambda c: (c.reconcile(T0), c.succeed_branches(), c.reconcile(at(1)), c.finish("merge"),
                             c.reconcile(at(2)), c.finish("eval")), "Succeeded", "True/Succeeded", "False", 0),
    ("branch failed", lambda c: (c.reconcile(T0), c.branch("math", phase="Failed")), "Failed",
     "False/BranchFailed", "False", 0),
    ("merge failed", lambda c: (c.reconcile(T0), c.succeed_branches(), c.reconcile(at(1)), c.finish("merge", ok=False)),
     "Failed", "False/MergeFailed", "False", 0),
    ("eval failed", _eval_failed, "Failed", "False/EvaluationFailed", "False", 0),
    ("suspended", lambda c: (c.reconcile(T0), c.edit(lambda s: s.update(runPolicy={"suspend": True}))), "Suspended",
     "False/Suspended", "False", 0),
    ("suspended before start", lambda c: c.edit(lambda s: s.update(runPolicy={"suspend": True})), "Suspended",
     "False/Suspended", "False", 0),
    ("deadline", lambda c: (c.edit(lambda s: s.update(runPolicy={"activeDeadlineSeconds": 5})), c.reconcile(T0)),
     "Failed", "False/DeadlineExceeded", "False", 0),
    ("invalid spec", lambda c: (c.reconcile(T0), c.edit(lambda s: s.update(branches=s["branches"][:1]))),
     "Pending", "False/InvalidSpec", "False", 0),
]


@pytest.mark.parametrize(("state", "setup", "phase", "ready", "reconciling", "creates"), TABLE, ids=[r[0] for r in TABLE])
def test_decision_table(
    state: str, setup: Callable[[Cluster], Any], phase: str, ready: str, reconciling: str, creates: int
) -> None:
    c = Cluster.new()
    setup(c)
    plan = c.reconcile(at(10))
    assert c.status["phase"] == phase
    cond = c.cond("Ready")
    assert f"{cond['status']}/{cond['reason']}" == ready
    assert c.cond("Reconciling")["status"] == reconciling
    assert c.cond("Stalled")["status"] == ("True" if phase == "Failed" or ready.endswith("InvalidSpec") else "False")
    assert len(plan.create) == creates
    assert c.status["observedGeneration"] == c.obj["metadata"]["generation"]
    assert no_empty_strings(plan.status_patch())

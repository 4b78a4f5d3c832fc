"""The pure planner: (Distillation, observed children, now) -> desired children + status.

No I/O, no kopf, no Kubernetes client: the kopf handlers observe, call `plan_distillation`,
and apply the returned `Plan`; tests drive the same function with tables. Decisions:

* Children have deterministic names (`<dist>-<branch>`, `<dist>-merge-<fp8>`,
  `<dist>-eval-<fp8>`) and carry their stage fingerprint as a label, so a restarted operator
  finds them and a spec change is detected by comparing fingerprints: only stages whose
  fingerprint changed are redone; stale children are deleted.
* What finished is remembered in the status (per-stage phase + fingerprint), so children
  removed by `ttlSecondsAfterFinished` are not re-created when an unrelated field changes.
* Terminal states are sticky: a Succeeded/Failed Distillation whose generation has not
  changed creates nothing, whatever happened to its children. A spec change re-plans and
  retries the stages that had failed (with fresh retry budgets).
* A failure anywhere (a branch whose gang exhausted its backoffLimit, a failed merge or eval
  Job, the overall deadline) fails the Distillation and deletes the children that still run,
  so nothing keeps burning GPUs for a result that cannot be used.
* Suspend propagates to BranchJobs (which delete their pods and keep progress); merge/eval
  Jobs are deleted (batch Job suspend does not exist in Kubernetes 1.20) and re-created, with
  the same name, on resume — a stage with a committed output returns at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from branchmerge_trainer.stages import EvalStage, MergeStage, Progress, Score, StageResult

from .api import (
    BranchJob,
    BranchPhase,
    BranchStatus,
    Distillation,
    DistillationStatus,
    EvaluationStatus,
    ImageSpec,
    JobResources,
    MergeStatus,
    OutputSpec,
    Phase,
    StagePhase,
    check_manifest,
    merge_patch,
    plain,
)
from .conditions import (
    BRANCHES_SUCCEEDED,
    DISTILLATION_TYPES,
    EVALUATED,
    FAILED,
    MERGED,
    READY,
    RECONCILING,
    STALLED,
    SUCCEEDED,
    SUSPENDED,
    ConditionSet,
    Event,
    find,
    rfc3339,
    seconds_since,
)
from .derive import (
    PipelineStages,
    Stage,
    branchjob_for,
    pipeline_stages,
    stages_for,
)
from .gang import BranchJobPlan, GangPod, ObservedPod, plan_branchjob
from .naming import (
    ANNOTATION_GENERATION,
    KUEUE_QUEUE_LABEL,
    LABEL_BRANCH,
    LABEL_DISTILLATION,
    LABEL_FINGERPRINT,
    LABEL_STAGE,
    MANAGED_BY,
    branchjob_name,
    eval_job_name,
    merge_job_name,
)
from .validation import first_line

TERMINAL: tuple[str, ...] = ("Succeeded", "Failed")
#: Safety-net resync while work is in flight (child events drive most reconciles).
REQUEUE_RUNNING = 60.0
#: While waiting for a deleted child to disappear before re-creating it under its name.
REQUEUE_DELETING = 5.0
RESULT_PREFIX = "BRANCHMERGE_RESULT "

_BRANCH_PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")

StageRole = Literal["merge", "eval"]


def parse_result(text: str | None) -> StageResult | None:
    """A StageResult from a termination message (or a `BRANCHMERGE_RESULT {…}` log line)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith(RESULT_PREFIX):
        text = text[len(RESULT_PREFIX) :]
    try:
        return StageResult.model_validate_json(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class ObservedBranchJob:
    """What the planner needs to know about one existing BranchJob."""

    name: str
    branch: str
    fingerprint: str | None = None
    phase: BranchPhase | None = None
    progress: Progress | None = None
    restarts: int = 0
    reason: str | None = None
    message: str | None = None
    output_uri: str | None = None
    suspended: bool = False
    deleting: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ObservedBranchJob:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        progress = None
        if status.get("progress"):
            try:
                progress = Progress.model_validate(status["progress"])
            except ValidationError:
                progress = None
        phase = status.get("phase")
        return cls(
            name=str(meta.get("name", "")),
            branch=str(labels.get(LABEL_BRANCH) or spec.get("stageName") or ""),
            fingerprint=labels.get(LABEL_FINGERPRINT),
            phase=phase if phase in _BRANCH_PHASES else None,
            progress=progress,
            restarts=int(status.get("restarts") or 0),
            reason=status.get("reason"),
            message=status.get("message"),
            output_uri=status.get("outputUri"),
            suspended=bool((spec.get("runPolicy") or {}).get("suspend")),
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class ObservedJob:
    """One existing merge or eval `batch/v1` Job and the StageResult its pod reported."""

    name: str
    stage: StageRole
    fingerprint: str | None = None
    phase: Literal["Active", "Succeeded", "Failed"] = "Active"
    result: StageResult | None = None
    message: str | None = None
    deleting: bool = False

    @classmethod
    def from_object(cls, job: Mapping[str, Any], result: StageResult | str | None = None) -> ObservedJob:
        """`result`: the parsed StageResult or the raw termination message of the Job's pod."""
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = job.get("status") or {}
        phase: Literal["Active", "Succeeded", "Failed"] = "Active"
        message = None
        for cond in status.get("conditions") or []:
            if cond.get("status") != "True":
                continue
            if cond.get("type") == "Complete":
                phase = "Succeeded"
            elif cond.get("type") == "Failed":
                phase = "Failed"
                message = cond.get("message") or cond.get("reason")
        parsed = parse_result(result) if isinstance(result, str) else result
        stage: StageRole = "eval" if labels.get(LABEL_STAGE) == "eval" else "merge"
        return cls(
            name=str(meta.get("name", "")),
            stage=stage,
            fingerprint=labels.get(LABEL_FINGERPRINT),
            phase=phase,
            result=parsed,
            message=message,
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class Observed:
    """Children of one Distillation as last seen (select them by LABEL_DISTILLATION)."""

    branch_jobs: Sequence[ObservedBranchJob] = ()
    jobs: Sequence[ObservedJob] = ()


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ChildRef:
    """A child to delete. Delete Jobs with propagationPolicy=Background so their pods go too."""

    kind: Literal["BranchJob", "Job"]
    name: str
    reason: str


@dataclass(frozen=True)
class ChildPatch:
    """A JSON merge patch for an existing child (today: spec.runPolicy.suspend of a BranchJob)."""

    kind: Literal["BranchJob"]
    name: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class StageJob:
    """A merge or eval stage to run as a `batch/v1` Job (workloads.py renders the manifest:
    one pod running `branchmerge-train <stage> --config`, with the stage JSON)."""

    name: str
    stage: MergeStage | EvalStage
    resources: JobResources
    image: ImageSpec
    output: OutputSpec
    backoff_limit: int
    queue_name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> StageRole:
        return "merge" if self.stage.kind == "Merge" else "eval"

    @property
    def command(self) -> list[str]:
        return ["branchmerge-train", self.role, "--config"]


@dataclass
class Plan:
    """What should happen after one reconcile of a Distillation.

    Apply in this order: delete, create (tolerate AlreadyExists), patch, then write
    `status_patch()` to the status subresource and emit `events`; requeue after
    `requeue_after` seconds if set. Only `delete` removes anything: `branch_jobs` and `jobs`
    list the children this generation wants (informational; a sticky terminal plan lists
    none and deletes nothing it does not name).
    """

    status: DistillationStatus
    #: BranchJobs that should exist now (full objects; the caller adds ownerReferences).
    branch_jobs: list[BranchJob] = field(default_factory=list)
    #: Merge/eval Jobs that should exist now.
    jobs: list[StageJob] = field(default_factory=list)
    #: The subset of branch_jobs + jobs not observed: create these.
    create: list[BranchJob | StageJob] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def status_patch(self) -> dict[str, Any]:
        """The status as a merge patch: fields that became empty are sent as null."""
        return merge_patch(self.status)


def headline(results: Sequence[Score], model: str = "merged") -> str | None:
    """`aime2024=78.1 gpqa-diamond=65.0` for one model (the first scored if `model` is absent)."""
    if not results:
        return None
    chosen = model if any(s.model == model for s in results) else results[0].model
    parts = [f"{s.benchmark}={s.score * 100:.1f}" for s in results if s.model == chosen]
    return " ".join(parts) or None


def _percent(progress: Progress | None) -> float | None:
    if progress is None or not progress.total_steps:
        return None
    return round(100.0 * min(progress.step, progress.total_steps) / progress.total_steps, 1)


def _lenient_status(data: Any) -> DistillationStatus:
    if isinstance(data, DistillationStatus):
        return data
    try:
        return DistillationStatus.model_validate(data or {})
    except ValidationError:
        return DistillationStatus()


@dataclass
class _StageOutcome:
    phase: StagePhase
    message: str | None = None
    output_uri: str | None = None
    result: StageResult | None = None
    create: StageJob | None = None
    waiting_delete: bool = False


class _DistillationPlanner:
    def __init__(self, dist: Distillation, prev: DistillationStatus, observed: Observed, now: datetime) -> None:
        self.dist = dist
        self.spec = dist.spec
        self.prev = prev
        self.observed = observed
        self.now = now
        self.gen = dist.generation
        self.stages: PipelineStages = pipeline_stages(dist)
        self.spec_changed = prev.observed_generation is not None and prev.observed_generation != self.gen
        self.suspended = self.spec.run_policy.suspend
        self.plan = Plan(status=DistillationStatus())
        self.waiting_deletes = False
        self._deleted: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ helpers

    def remove(self, kind: Literal["BranchJob", "Job"], name: str, reason: str, *, deleting: bool = False) -> None:
        if deleting or (kind, name) in self._deleted:
            return
        self._deleted.add((kind, name))
        self.plan.delete.append(ChildRef(kind, name, reason))
        self.plan.events.append(Event("Normal", "Deleted", f"Deleted {kind} {name}: {reason}"))

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def ttl_cleanup(self, completion: str | None) -> float | None:
        """Delete every child once ttlSecondsAfterFinished has passed; returns the requeue."""
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        if ttl is None:
            return None
        elapsed = seconds_since(completion, self.now)
        if elapsed is None:
            return None
        if elapsed < ttl:
            return float(ttl - elapsed)
        before = len(self.plan.delete)
        for bj in self.observed.branch_jobs:
            self.remove("BranchJob", bj.name, "ttlSecondsAfterFinished expired", deleting=bj.deleting)
        for job in self.observed.jobs:
            self.remove("Job", job.name, "ttlSecondsAfterFinished expired", deleting=job.deleting)
        if len(self.plan.delete) > before:
            self.event("Normal", "TTLExpired", f"deleted {len(self.plan.delete) - before} children after {ttl}s")
        return None

    def stop_active_children(self, reason: str) -> None:
        """Children that still run are deleted once the Distillation has failed."""
        for bj in self.observed.branch_jobs:
            if bj.phase not in TERMINAL:
                self.remove("BranchJob", bj.name, reason, deleting=bj.deleting)
        for job in self.observed.jobs:
            if job.phase == "Active":
                self.remove("Job", job.name, reason, deleting=job.deleting)

    def stage_job(self, role: StageRole, stage: MergeStage | EvalStage) -> StageJob:
        spec = self.spec
        name = merge_job_name(self.dist.name, stage.fingerprint) if role == "merge" else eval_job_name(
            self.dist.name, stage.fingerprint
        )
        resources = spec.merge.resources if role == "merge" or spec.eval is None else spec.eval.resources
        labels = {
            **MANAGED_BY,
            LABEL_DISTILLATION: self.dist.name,
            LABEL_STAGE: role,
            LABEL_FINGERPRINT: stage.fingerprint,
        }
        if spec.queue_name:
            labels[KUEUE_QUEUE_LABEL] = spec.queue_name
        return StageJob(
            name=name,
            stage=stage,
            resources=resources,
            image=spec.image,
            output=spec.output,
            backoff_limit=spec.run_policy.backoff_limit,
            queue_name=spec.queue_name,
            labels=labels,
            annotations={ANNOTATION_GENERATION: str(self.gen)},
        )

    # ------------------------------------------------------------------ sticky terminal

    def sticky(self) -> Plan:
        prev = self.prev
        if prev.phase == "Failed":
            self.stop_active_children("the Distillation has failed")
        self.plan.requeue_after = self.ttl_cleanup(prev.completion_time)
        self.plan.status = prev.model_copy(deep=True)
        return self.plan

    # ------------------------------------------------------------------ branches

    def plan_branches(self) -> tuple[list[BranchStatus], list[BranchJob]]:
        prev_by_name = {b.name: b for b in self.prev.branches}
        observed = {o.name: o for o in self.observed.branch_jobs}
        summaries: list[BranchStatus] = []
        to_create: list[BranchJob] = []
        wanted: set[str] = set()
        for branch in self.spec.branches:
            stage = self.stages.branches[branch.name]
            fp = stage.fingerprint
            name = branchjob_name(self.dist.name, branch.name)
            wanted.add(name)
            desired = branchjob_for(self.dist, branch, stage)
            obs = observed.get(name)
            pb = prev_by_name.get(branch.name)
            remembered = pb is not None and pb.phase == "Succeeded" and pb.fingerprint == fp
            summary = BranchStatus(name=branch.name, fingerprint=fp, branch_job=name, phase="Pending")
            if remembered and pb is not None:
                summary.output_uri = pb.output_uri or stage.output
            if obs is not None and (obs.fingerprint != fp or obs.deleting):
                self.remove("BranchJob", name, "its spec changed (new fingerprint)", deleting=obs.deleting)
                if remembered:
                    summary.phase = "Succeeded"
                else:
                    summary.message = f"waiting for the old BranchJob {name} to be deleted"
                    self.waiting_deletes = True
            elif obs is not None:
                phase = obs.phase or "Pending"
                retry = (
                    phase == "Failed"
                    and self.spec_changed
                    and pb is not None
                    and pb.phase == "Failed"
                    and pb.fingerprint == fp
                )
                if retry:
                    self.remove("BranchJob", name, "retrying a failed branch after a spec change")
                    summary.message = "retrying after a spec change"
                    self.waiting_deletes = True
                else:
                    summary.phase = phase
                    summary.restarts = obs.restarts
                    summary.progress = _percent(obs.progress)
                    if obs.progress is not None:
                        summary.step = obs.progress.step
                        summary.total_steps = obs.progress.total_steps
                    if phase == "Succeeded":
                        summary.output_uri = obs.output_uri or stage.output
                        summary.progress = 100.0
                    if phase == "Failed":
                        summary.message = ": ".join(x for x in (obs.reason, obs.message) if x) or "failed"
                    elif obs.message:
                        summary.message = obs.message
                    self.plan.branch_jobs.append(desired)
                    if obs.suspended != self.suspended and phase not in TERMINAL:
                        self.plan.patch.append(
                            ChildPatch("BranchJob", name, {"spec": {"runPolicy": {"suspend": self.suspended}}})
                        )
            elif remembered:
                summary.phase = "Succeeded"
                summary.progress = 100.0
            else:
                to_create.append(desired)
            summaries.append(summary)
        for obs in self.observed.branch_jobs:
            if obs.name not in wanted:
                self.remove("BranchJob", obs.name, "its branch was removed from the spec", deleting=obs.deleting)
        return summaries, to_create

    # ------------------------------------------------------------------ merge / eval

    def plan_stage(
        self, role: StageRole, stage: MergeStage | EvalStage, ready: bool, prev: MergeStatus | EvaluationStatus | None
    ) -> _StageOutcome:
        fp = stage.fingerprint
        match: ObservedJob | None = None
        for job in self.observed.jobs:
            if job.stage != role:
                continue
            if job.fingerprint != fp:
                self.remove("Job", job.name, f"superseded by {role} fingerprint {fp[:8]}", deleting=job.deleting)
            else:
                match = job
        remembered = prev is not None and prev.phase == "Succeeded" and prev.fingerprint == fp
        if not ready:
            return _StageOutcome("Waiting")
        job_spec = self.stage_job(role, stage)
        if match is not None and match.deleting:
            self.waiting_deletes = True
            return _StageOutcome("Waiting", f"waiting for Job {match.name} to be deleted")
        if match is not None:
            if match.phase == "Failed" and self.spec_changed and prev is not None and prev.phase == "Failed" \
                    and prev.fingerprint == fp:
                self.remove("Job", match.name, f"retrying the failed {role} after a spec change")
                self.waiting_deletes = True
                return _StageOutcome("Waiting", "retrying after a spec change")
            self.plan.jobs.append(job_spec)
            if match.phase == "Active":
                return _StageOutcome("Running", f"Job {match.name} is running")
            if match.phase == "Succeeded":
                output = (match.result.output if match.result else None) or stage.output
                note = None if match.result else "the Job succeeded but its result was not readable"
                return _StageOutcome("Succeeded", note, output, match.result)
            error = match.result.error if match.result else None
            message = f"{error.reason}: {error.message}" if error else (match.message or "the Job failed")
            return _StageOutcome("Failed", message, result=match.result)
        if remembered and prev is not None:
            return _StageOutcome("Succeeded", None, prev.output_uri or stage.output)
        return _StageOutcome("Waiting", None, create=job_spec)

    # ------------------------------------------------------------------ main

    def run(self) -> Plan:
        prev, spec, now = self.prev, self.spec, self.now
        if prev.phase in TERMINAL and prev.observed_generation == self.gen:
            return self.sticky()
        rerun = self.spec_changed and prev.phase in TERMINAL
        start_time = prev.start_time
        if not self.suspended and (start_time is None or prev.phase == "Suspended" or rerun):
            start_time = rfc3339(now)

        branches, branch_creates = self.plan_branches()
        all_branches = all(b.phase == "Succeeded" for b in branches)
        merge = self.plan_stage("merge", self.stages.merge, all_branches, prev.merge)
        if self.stages.eval is not None:
            evaluation = self.plan_stage("eval", self.stages.eval, merge.phase == "Succeeded", prev.evaluation)
        else:
            evaluation = _StageOutcome("Skipped", "no eval configured")
            for job in self.observed.jobs:
                if job.stage == "eval":
                    self.remove("Job", job.name, "eval was removed from the spec", deleting=job.deleting)

        # Failure: the overall deadline first (unless everything is done), then the first
        # failed stage in pipeline order.
        done = all_branches and merge.phase == "Succeeded" and evaluation.phase in ("Succeeded", "Skipped")
        failure: tuple[str, str] | None = None
        deadline = spec.run_policy.active_deadline_seconds
        elapsed = seconds_since(start_time, now)
        if not (self.suspended or done) and deadline is not None and elapsed is not None and elapsed >= deadline:
            failure = ("DeadlineExceeded", f"still running after activeDeadlineSeconds={deadline}")
        failed_branch = next((b for b in branches if b.phase == "Failed"), None)
        if failure is None and failed_branch is not None:
            failure = ("BranchFailed", f"branch {failed_branch.name} failed: {failed_branch.message}")
        if failure is None and merge.phase == "Failed":
            failure = ("MergeFailed", f"merge failed: {merge.message}")
        if failure is None and evaluation.phase == "Failed":
            failure = ("EvaluationFailed", f"evaluation failed: {evaluation.message}")

        creates: list[BranchJob | StageJob] = []
        if failure is not None:
            self.stop_active_children(f"the Distillation failed ({failure[0]})")
        elif self.suspended:
            for job in self.observed.jobs:
                if job.phase == "Active":
                    self.remove("Job", job.name, "suspended (it is re-created on resume)", deleting=job.deleting)
            for outcome in (merge, evaluation):
                if outcome.phase == "Running" or outcome.create is not None:
                    outcome.phase, outcome.message = "Waiting", "suspended"
            self.plan.jobs = [j for j in self.plan.jobs if (j.stage.kind == "Merge" and merge.phase == "Succeeded")
                              or (j.stage.kind == "Eval" and evaluation.phase == "Succeeded")]
            for b in branches:
                if b.phase not in TERMINAL:
                    b.phase = "Suspended"
        else:
            creates.extend(branch_creates)
            self.plan.branch_jobs.extend(branch_creates)
            for outcome in (merge, evaluation):
                if outcome.create is not None:
                    creates.append(outcome.create)
                    self.plan.jobs.append(outcome.create)
                    outcome.phase, outcome.message = "Running", f"created Job {outcome.create.name}"
        self.plan.create = creates
        for child in creates:
            kind = "BranchJob" if isinstance(child, BranchJob) else "Job"
            self.event("Normal", "Created", f"Created {kind} {child.metadata.name if isinstance(child, BranchJob) else child.name}")

        phase: Phase
        if failure is not None:
            phase = "Failed"
        elif done:
            phase = "Succeeded"
        elif self.suspended:
            phase = "Suspended"
        elif all_branches and merge.phase != "Succeeded":
            phase = "Merging"
        elif merge.phase == "Succeeded":
            phase = "Evaluating"
        elif any(b.phase in ("Running", "Restarting", "Succeeded") for b in branches):
            phase = "Running"
        else:
            phase = "Pending"

        completion = None
        if phase in TERMINAL:
            completion = prev.completion_time if prev.phase == phase and prev.completion_time else rfc3339(now)
        status = self.build_status(phase, failure, branches, merge, evaluation, start_time, completion)
        self.transition_events(phase, failure, branches, merge, evaluation, status)
        self.plan.status = status

        if phase in TERMINAL:
            self.plan.requeue_after = self.ttl_cleanup(completion)
        elif self.waiting_deletes:
            self.plan.requeue_after = REQUEUE_DELETING
        elif phase == "Suspended":
            self.plan.requeue_after = None
        else:
            requeue = REQUEUE_RUNNING
            if deadline is not None and elapsed is not None:
                requeue = min(requeue, max(1.0, deadline - elapsed))
            self.plan.requeue_after = requeue
        return self.plan

    def build_status(
        self,
        phase: Phase,
        failure: tuple[str, str] | None,
        branches: list[BranchStatus],
        merge: _StageOutcome,
        evaluation: _StageOutcome,
        start_time: str | None,
        completion: str | None,
    ) -> DistillationStatus:
        stages = self.stages
        succeeded = sum(b.phase == "Succeeded" for b in branches)
        results: list[Score] = []
        if evaluation.phase == "Succeeded":
            if evaluation.result is not None:
                results = list(evaluation.result.scores)
            elif (
                self.prev.evaluation is not None
                and stages.eval is not None
                and self.prev.evaluation.fingerprint == stages.eval.fingerprint
            ):
                results = list(self.prev.evaluation.results)
        merged_uri = merge.output_uri if merge.phase == "Succeeded" else None
        eval_stage = stages.eval
        status = DistillationStatus(
            observed_generation=self.gen,
            phase=phase,
            branches=branches,
            merge=MergeStatus(
                phase=merge.phase,
                fingerprint=stages.merge.fingerprint,
                output_uri=merged_uri,
                job_name=merge_job_name(self.dist.name, stages.merge.fingerprint),
                message=merge.message,
            ),
            evaluation=EvaluationStatus(
                phase=evaluation.phase,
                fingerprint=eval_stage.fingerprint if eval_stage else None,
                job_name=eval_job_name(self.dist.name, eval_stage.fingerprint) if eval_stage else None,
                output_uri=(evaluation.output_uri or eval_stage.output) if eval_stage and evaluation.phase == "Succeeded" else None,
                message=evaluation.message,
                results=results,
            ),
            branches_succeeded=f"{succeeded}/{len(branches)}",
            merged_model=merged_uri,
            headline=headline(results),
            start_time=start_time,
            completion_time=completion,
        )
        status.conditions = self.conditions(phase, failure, branches, merge, evaluation, status)
        return status

    def conditions(
        self,
        phase: Phase,
        failure: tuple[str, str] | None,
        branches: list[BranchStatus],
        merge: _StageOutcome,
        evaluation: _StageOutcome,
        status: DistillationStatus,
    ) -> list[Any]:
        conds = ConditionSet(self.prev.conditions, self.now, self.gen, DISTILLATION_TYPES)
        progress_reason = {"Pending": "Pending", "Running": "BranchesRunning", "Merging": "Merging",
                           "Evaluating": "Evaluating"}.get(phase, phase)
        summary = self.summary(phase, branches, status)
        if failure is not None:
            reason, message = failure
            conds.set(READY, "False", reason, message)
            conds.set(SUCCEEDED, "False", reason, message)
            conds.set(FAILED, "True", reason, message)
            conds.set(RECONCILING, "False", reason, message)
            conds.set(STALLED, "True", reason, message)
        elif phase == "Succeeded":
            conds.set(READY, "True", "Succeeded", summary)
            conds.set(SUCCEEDED, "True", "Succeeded", summary)
            conds.set(FAILED, "False", "Succeeded")
            conds.set(RECONCILING, "False", "Succeeded")
            conds.set(STALLED, "False", "Succeeded")
        elif phase == "Suspended":
            conds.set(READY, "False", "Suspended", summary)
            conds.set(SUCCEEDED, "Unknown", "Suspended", summary)
            conds.set(FAILED, "False", "Suspended")
            conds.set(RECONCILING, "False", "Suspended", summary)
            conds.set(STALLED, "False", "Suspended")
        else:
            conds.set(READY, "False", progress_reason, summary)
            conds.set(SUCCEEDED, "Unknown", progress_reason, summary)
            conds.set(FAILED, "False", progress_reason)
            conds.set(RECONCILING, "True", progress_reason, summary)
            conds.set(STALLED, "False", progress_reason)
        if self.suspended and phase not in TERMINAL:
            conds.set(SUSPENDED, "True", "Suspended", "spec.runPolicy.suspend is true")
        else:
            conds.set(SUSPENDED, "False", "NotSuspended")
        done = sum(b.phase == "Succeeded" for b in branches)
        failed = [b for b in branches if b.phase == "Failed"]
        text = f"{done}/{len(branches)} branches succeeded"
        if done == len(branches):
            conds.set(BRANCHES_SUCCEEDED, "True", "AllSucceeded", text)
        elif failed:
            conds.set(BRANCHES_SUCCEEDED, "False", "BranchFailed", f"{text}; failed: {', '.join(b.name for b in failed)}")
        else:
            conds.set(BRANCHES_SUCCEEDED, "False", "Suspended" if self.suspended else "InProgress", text)
        for type_, outcome, uri in ((MERGED, merge, status.merged_model), (EVALUATED, evaluation, status.headline)):
            if outcome.phase == "Succeeded":
                conds.set(type_, "True", "Succeeded", uri or "")
            elif outcome.phase == "Skipped":
                conds.set(type_, "True", "NotRequested", outcome.message or "")
            else:
                conds.set(type_, "False", outcome.phase, outcome.message or "")
        return conds.result()

    def summary(self, phase: Phase, branches: list[BranchStatus], status: DistillationStatus) -> str:
        if phase == "Succeeded":
            return f"merged model {status.merged_model}" + (f"; {status.headline}" if status.headline else "")
        if phase == "Merging":
            return "merging the branches"
        if phase == "Evaluating":
            return "evaluating the merged model"
        running = [b.name for b in branches if b.phase not in TERMINAL]
        text = f"branches {status.branches_succeeded} succeeded"
        return f"{text}; in progress: {', '.join(running)}" if running else text

    def transition_events(
        self,
        phase: Phase,
        failure: tuple[str, str] | None,
        branches: list[BranchStatus],
        merge: _StageOutcome,
        evaluation: _StageOutcome,
        status: DistillationStatus,
    ) -> None:
        prev = self.prev
        prev_branches = {b.name: b for b in prev.branches}
        if self.spec_changed:
            redo = [b.name for b in branches if (p := prev_branches.get(b.name)) is not None and p.fingerprint != b.fingerprint]
            if prev.merge is not None and prev.merge.fingerprint not in (None, self.stages.merge.fingerprint):
                redo.append("merge")
            if (prev.evaluation is not None and self.stages.eval is not None
                    and prev.evaluation.fingerprint not in (None, self.stages.eval.fingerprint)):
                redo.append("eval")
            if redo:
                self.event("Normal", "SpecChanged", f"generation {self.gen}: redoing {', '.join(redo)}")
        for b in branches:
            p = prev_branches.get(b.name)
            changed = p is None or p.phase != b.phase or p.fingerprint != b.fingerprint
            if changed and b.phase == "Succeeded":
                self.event("Normal", "BranchSucceeded", f"branch {b.name}: {b.output_uri}")
            elif changed and b.phase == "Failed":
                self.event("Warning", "BranchFailed", f"branch {b.name}: {b.message}")
        for label, outcome, before, fp in (
            ("Merge", merge, prev.merge, self.stages.merge.fingerprint),
            ("Evaluation", evaluation, prev.evaluation, self.stages.eval.fingerprint if self.stages.eval else None),
        ):
            changed = before is None or before.phase != outcome.phase or before.fingerprint != fp
            if changed and outcome.phase == "Succeeded":
                what = status.merged_model if label == "Merge" else status.headline
                self.event("Normal", f"{label}Succeeded", f"{label.lower()} succeeded: {what}")
            elif changed and outcome.phase == "Failed":
                self.event("Warning", f"{label}Failed", outcome.message or "")
        if phase != prev.phase:
            if failure is not None:
                self.event("Warning", failure[0], failure[1])
            elif phase == "Succeeded":
                self.event("Normal", "Succeeded", self.summary(phase, branches, status))
            elif phase == "Suspended":
                self.event("Normal", "Suspended", "spec.runPolicy.suspend is true; running pods are stopped")
            elif prev.phase == "Suspended":
                self.event("Normal", "Resumed", f"resumed in phase {phase}")


def _stalled_plan(prev: DistillationStatus, generation: int, message: str, now: datetime) -> Plan:
    """An invalid spec: report it, touch nothing (running children keep running)."""
    conds = ConditionSet(prev.conditions, now, generation, DISTILLATION_TYPES)
    conds.set(STALLED, "True", "InvalidSpec", message)
    conds.set(READY, "False", "InvalidSpec", message)
    conds.set(RECONCILING, "False", "InvalidSpec", message)
    conds.keep_previous()
    for type_ in (SUCCEEDED, FAILED, SUSPENDED):
        if conds.get(type_) is None:
            conds.set(type_, "Unknown", "InvalidSpec")
    status = prev.model_copy(
        update={"observed_generation": generation, "phase": prev.phase or "Pending", "conditions": conds.result()}
    )
    old = find(prev.conditions, STALLED)
    already = old is not None and old.status == "True" and old.reason == "InvalidSpec" and old.message == message
    events = [] if already else [Event("Warning", "InvalidSpec", message)]
    return Plan(status=status, events=events)


def plan_distillation(obj: Distillation | Mapping[str, Any], observed: Observed, now: datetime) -> Plan:
    """Plan one reconcile. `obj` is the Distillation as read from the API (a dict, validated
    here so that an invalid spec becomes a Stalled condition) or an already parsed model;
    `now` is passed in because the planner reads no clock."""
    if isinstance(obj, Distillation):
        return _DistillationPlanner(obj, obj.status or DistillationStatus(), observed, now).run()
    raw = plain(obj)
    prev = _lenient_status(raw.get("status"))
    meta = raw.get("metadata") or {}
    generation = int(meta.get("generation") or 1)
    parsed, report = check_manifest({k: v for k, v in raw.items() if k != "status"})
    if not isinstance(parsed, Distillation):
        if parsed is not None:
            report.add("kind", f"expected a Distillation, got {parsed.kind}")
        return _stalled_plan(prev, generation, first_line([report]), now)
    return _DistillationPlanner(parsed, prev, observed, now).run()


__all__ = [
    "BranchJobPlan",
    "ChildPatch",
    "ChildRef",
    "GangPod",
    "Observed",
    "ObservedBranchJob",
    "ObservedJob",
    "ObservedPod",
    "Plan",
    "Stage",
    "StageJob",
    "headline",
    "parse_result",
    "plan_branchjob",
    "plan_distillation",
    "stages_for",
]

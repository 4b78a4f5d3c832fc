"""The pure gang planner: (BranchJob, observed pods, now) -> pods to create/delete + status.

A BranchJob runs as a *gang*: `nodes` pods named `<bj>-<rank>` plus a headless Service
`<bj>` for torch.distributed rendezvous. Rules, each answering a complaint users of the
peers keep filing (see reference/kubernetes.md):

* All pods of a gang are created together (and admitted together by Kueue as one pod
  group); a gang is never left half-running: when any pod fails, the whole gang is deleted
  and re-created (a new *attempt*), resuming from the last checkpoint in object storage.
* Failures count against `backoffLimit`; disruptions (eviction, preemption, node loss, a
  pod deleted from outside) are counted separately and never exhaust it.
* `startupDeadlineSeconds` fails a gang whose pods do not all run in time, with the cause
  as the reason (Unschedulable, ImagePullBackOff, …) instead of hanging forever.
* `suspend` deletes the pods and keeps progress; resuming creates a new attempt.
* Terminal states are sticky until the spec changes; a changed spec retries a failed run
  with fresh counters.

Pods are represented abstractly (`ObservedPod`) so the planner stays pure and table-tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from branchmerge_trainer.stages import Progress, SFTStage, StageResult

from .api import BranchJob, BranchJobStatus, BranchPhase, check_manifest, merge_patch, plain
from .conditions import (
    BRANCHJOB_TYPES,
    FAILED,
    READY,
    RECONCILING,
    RUNNING,
    STALLED,
    SUCCEEDED,
    SUSPENDED,
    ConditionSet,
    Event,
    find,
    parse_time,
    rfc3339,
    seconds_since,
)
from .derive import stage_for_branchjob
from .naming import (
    KUEUE_POD_GROUP_COUNT_ANNOTATION,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_BRANCH,
    LABEL_BRANCHJOB,
    LABEL_DISTILLATION,
    LABEL_FINGERPRINT,
    LABEL_RANK,
    LABEL_STAGE,
    MANAGED_BY,
    MASTER_PORT,
    master_addr,
    pod_group_name,
    pod_name,
    service_name,
)
from .validation import first_line

PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]

#: Pod status reasons that mean "the platform took the pod away", not "the job failed".
DISRUPTION_REASONS = frozenset(
    {"Evicted", "Preempting", "Preempted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "NodeAffinity"}
)
#: Container waiting reasons worth naming when a gang does not start in time.
STARTUP_WAITING_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "ContainerCreating",
)
#: StageResult error reasons a restart cannot fix: fail at once instead of retrying.
NON_RETRYABLE_REASONS = frozenset({"InvalidInput", "InvalidConfig"})

REQUEUE_RUNNING = 60.0
REQUEUE_DELETING = 2.0


def final_progress(result: StageResult) -> Progress | None:
    """Progress from the result when no log line was read (a short run between two reads,
    or a kubelet that serves no logs): `kubectl get bj` still shows where training ended."""
    m = result.metrics
    steps = int(m.get("steps") or 0)
    if steps <= 0:
        return None

    def finite(key: str) -> float | None:
        v = m.get(key)
        return float(v) if v is not None and math.isfinite(v) else None

    return Progress(
        step=steps,
        total_steps=steps,
        loss=finite("final_loss"),
        tokens_per_second=finite("tokens_per_second"),
        eta_seconds=0.0,
    )


@dataclass(frozen=True)
class ObservedPod:
    """One gang pod as the planner needs to see it (see `from_object` for the mapping)."""

    name: str
    rank: int
    attempt: int = 0
    phase: PodPhase = "Pending"
    reason: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    termination_message: str | None = None
    deleting: bool = False
    created: datetime | None = None
    started: datetime | None = None
    unschedulable: str | None = None
    disruption_target: bool = False
    fingerprint: str | None = None
    progress: Progress | None = None

    @classmethod
    def from_object(cls, pod: Mapping[str, Any], progress: Progress | None = None) -> ObservedPod:
        """From a core/v1 Pod dict; `progress` is rank 0's last progress line (from its log)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        waiting_reason = waiting_message = terminated_reason = termination_message = None
        exit_code = None
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            if "waiting" in state and waiting_reason is None:
                waiting_reason = (state["waiting"] or {}).get("reason")
                waiting_message = (state["waiting"] or {}).get("message")
            if "terminated" in state and exit_code is None:
                term = state["terminated"] or {}
                exit_code = term.get("exitCode")
                terminated_reason = term.get("reason")
                termination_message = term.get("message")
        unschedulable = None
        disruption = False
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable = cond.get("message") or "Unschedulable"
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                disruption = True
        phases: dict[str, PodPhase] = {
            "Pending": "Pending", "Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"
        }
        phase = phases.get(status.get("phase") or "Pending", "Unknown")
        return cls(
            name=str(meta.get("name", "")),
            rank=int(labels.get(LABEL_RANK, 0)),
            attempt=int(labels.get(LABEL_ATTEMPT, 0)),
            phase=phase,
            reason=status.get("reason"),
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            exit_code=exit_code,
            terminated_reason=terminated_reason,
            termination_message=termination_message,
            deleting=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")),
            started=parse_time(status.get("startTime")),
            unschedulable=unschedulable,
            disruption_target=disruption,
            fingerprint=labels.get(LABEL_FINGERPRINT),
            progress=progress,
        )

    @property
    def disrupted(self) -> bool:
        """Taken away by the platform (drain, eviction, preemption, node loss, outside delete)."""
        return (
            self.disruption_target
            or self.deleting
            or self.phase == "Unknown"
            or (self.phase == "Failed" and self.reason in DISRUPTION_REASONS)
        )

    @property
    def result(self) -> StageResult | None:
        if not self.termination_message:
            return None
        try:
            return StageResult.model_validate_json(self.termination_message)
        except ValueError:
            return None

    def describe_failure(self) -> str:
        parts = [f"rank {self.rank} (pod {self.name})"]
        if self.reason:
            parts.append(self.reason)
        if self.terminated_reason and self.terminated_reason not in ("Error", "Completed"):
            parts.append(self.terminated_reason)
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        result = self.result
        if result is not None and result.error is not None:
            parts.append(f"{result.error.reason}: {result.error.message}")
        elif self.termination_message:
            parts.append(self.termination_message.strip()[:300])
        return ": ".join(parts)


@dataclass(frozen=True)
class GangPod:
    """A pod to create (workloads.py renders it: the stage JSON, image, resources, Secret env).

    `hostname`/`subdomain` give it the DNS name `<pod>.<service>` that `env["MASTER_ADDR"]`
    of every rank points at (rank 0)."""

    name: str
    rank: int
    attempt: int
    hostname: str
    subdomain: str
    labels: dict[str, str]
    annotations: dict[str, str]
    env: dict[str, str]


@dataclass(frozen=True)
class GangService:
    """The headless Service (clusterIP None, publishNotReadyAddresses) selecting the gang."""

    name: str
    labels: dict[str, str]
    selector: dict[str, str]


@dataclass
class BranchJobPlan:
    """What should happen after one reconcile of a BranchJob.

    Apply: write `status_patch()` first (it records the new attempt, so pods deleted next
    are recognised as the previous attempt's and not as a disruption), then delete
    `delete_pods` (and the Service if `delete_service`), ensure `service` exists, create
    `create_pods` (all of them, tolerating AlreadyExists), emit `events`, and requeue after
    `requeue_after` seconds if set.
    """

    status: BranchJobStatus
    stage: SFTStage | None = None
    service: GangService | None = None
    create_pods: list[GangPod] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    delete_service: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def status_patch(self) -> dict[str, Any]:
        return merge_patch(self.status)


def _lenient_status(data: Any) -> BranchJobStatus:
    if isinstance(data, BranchJobStatus):
        return data
    try:
        return BranchJobStatus.model_validate(data or {})
    except ValidationError:
        return BranchJobStatus()


class _GangPlanner:
    def __init__(self, bj: BranchJob, prev: BranchJobStatus, pods: Sequence[ObservedPod], now: datetime) -> None:
        self.bj = bj
        self.spec = bj.spec
        self.prev = prev
        self.pods = list(pods)
        self.now = now
        self.gen = bj.generation
        self.stage = stage_for_branchjob(bj)
        self.plan = BranchJobPlan(status=BranchJobStatus(), stage=self.stage)
        self.status = prev.model_copy(deep=True)
        self.status.observed_generation = self.gen
        self.status.fingerprint = self.stage.fingerprint
        self.status.checkpoint_uri = self.stage.checkpoints

    # ------------------------------------------------------------------ naming

    def selector(self) -> dict[str, str]:
        return {LABEL_BRANCHJOB: self.bj.name}

    def service(self) -> GangService:
        return GangService(
            name=service_name(self.bj.name), labels={**MANAGED_BY, **self.selector()}, selector=self.selector()
        )

    def gang(self, attempt: int, ranks: Sequence[int]) -> list[GangPod]:
        spec = self.spec
        nodes = spec.resources.nodes
        nproc = max(spec.resources.gpus_per_node, 1)
        inherited = {k: v for k, v in self.bj.metadata.labels.items() if k in (LABEL_DISTILLATION, LABEL_BRANCH)}
        pods = []
        for rank in ranks:
            name = pod_name(self.bj.name, rank)
            labels = {
                **MANAGED_BY,
                **inherited,
                **self.selector(),
                LABEL_STAGE: "branch",
                LABEL_RANK: str(rank),
                LABEL_ATTEMPT: str(attempt),
                LABEL_FINGERPRINT: self.stage.fingerprint,
            }
            annotations: dict[str, str] = {}
            if spec.queue_name:
                labels[KUEUE_QUEUE_LABEL] = spec.queue_name
                labels[KUEUE_POD_GROUP_LABEL] = pod_group_name(self.bj.name, attempt)
                annotations[KUEUE_POD_GROUP_COUNT_ANNOTATION] = str(nodes)
            addr = master_addr(self.bj.name)
            env = {
                "MASTER_ADDR": addr,
                "MASTER_PORT": str(MASTER_PORT),
                "NNODES": str(nodes),
                "NODE_RANK": str(rank),
                "NPROC_PER_NODE": str(nproc),
                "PET_MASTER_ADDR": addr,
                "PET_MASTER_PORT": str(MASTER_PORT),
                "PET_NNODES": str(nodes),
                "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": str(nproc),
                "BRANCHMERGE_ATTEMPT": str(attempt),
            }
            pods.append(
                GangPod(
                    name=name,
                    rank=rank,
                    attempt=attempt,
                    hostname=name,
                    subdomain=service_name(self.bj.name),
                    labels=labels,
                    annotations=annotations,
                    env=env,
                )
            )
        return pods

    # ------------------------------------------------------------------ actions

    def delete(self, pods: Sequence[ObservedPod]) -> None:
        for pod in pods:
            if not pod.deleting and pod.name not in self.plan.delete_pods:
                self.plan.delete_pods.append(pod.name)

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def finish(self, phase: BranchPhase, reason: str | None, message: str | None) -> BranchJobPlan:
        st = self.status
        previous_phase = self.prev.phase
        st.phase = phase
        st.reason = reason
        st.message = message
        if phase in ("Succeeded", "Failed") and not (previous_phase == phase and st.completion_time):
            st.completion_time = rfc3339(self.now)
        if phase not in ("Succeeded", "Failed"):
            st.completion_time = None
        st.conditions = self.conditions(phase, reason, message)
        if phase != previous_phase:
            if phase == "Succeeded":
                self.event("Normal", "Succeeded", f"output {st.output_uri}")
            elif phase == "Failed":
                self.event("Warning", reason or "Failed", message or "")
            elif phase == "Suspended":
                self.event("Normal", "Suspended", "pods deleted; progress kept")
            elif previous_phase == "Suspended":
                self.event("Normal", "Resumed", f"attempt {st.attempt}")
        self.plan.status = st
        return self.plan

    def conditions(self, phase: BranchPhase, reason: str | None, message: str | None) -> list[Any]:
        conds = ConditionSet(self.prev.conditions, self.now, self.gen, BRANCHJOB_TYPES)
        msg = message or ""
        if phase == "Succeeded":
            text = f"output {self.status.output_uri}"
            conds.set(READY, "True", "Succeeded", text)
            conds.set(SUCCEEDED, "True", "Succeeded", text)
            conds.set(FAILED, "False", "Succeeded")
            conds.set(RECONCILING, "False", "Succeeded")
            conds.set(STALLED, "False", "Succeeded")
            conds.set(RUNNING, "False", "Succeeded")
        elif phase == "Failed":
            why = reason or "Failed"
            for type_ in (READY, SUCCEEDED, RECONCILING, RUNNING):
                conds.set(type_, "False", why, msg)
            conds.set(FAILED, "True", why, msg)
            conds.set(STALLED, "True", why, msg)
        else:
            why = reason or phase
            conds.set(READY, "False", why, msg)
            conds.set(SUCCEEDED, "Unknown", why, msg)
            conds.set(FAILED, "False", why)
            conds.set(STALLED, "False", why)
            conds.set(RECONCILING, "False" if phase == "Suspended" else "True", why, msg)
            conds.set(RUNNING, "True" if phase == "Running" else "False", why, msg)
        conds.set(SUSPENDED, "True" if phase == "Suspended" else "False", "Suspended" if phase == "Suspended" else "NotSuspended")
        return conds.result()

    def ttl(self) -> None:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        elapsed = seconds_since(self.status.completion_time, self.now)
        if ttl is None or elapsed is None:
            return
        if elapsed >= ttl:
            self.delete(self.pods)
            self.plan.delete_service = True
            self.plan.requeue_after = None
        else:
            self.plan.requeue_after = float(ttl - elapsed)

    # ------------------------------------------------------------------ main

    def run(self) -> BranchJobPlan:
        prev, st, now = self.prev, self.status, self.now
        policy = self.spec.run_policy
        fp = self.stage.fingerprint
        new_run = prev.fingerprint is not None and prev.fingerprint != fp
        changed = prev.observed_generation is not None and prev.observed_generation != self.gen
        if prev.phase == "Succeeded" and not new_run:
            # Done, and the spec change (if any) does not change what is computed.
            st.output_uri = prev.output_uri or self.stage.output
            self.delete([p for p in self.pods if p.phase not in ("Succeeded", "Failed")])
            plan = self.finish("Succeeded", prev.reason, prev.message)
            self.ttl()
            return plan
        if prev.phase == "Failed" and not changed:
            self.delete([p for p in self.pods if p.phase not in ("Succeeded", "Failed")])
            plan = self.finish("Failed", prev.reason, prev.message)
            self.ttl()
            return plan
        if new_run or (prev.phase == "Failed" and changed):
            # A new computation (or a retry after a spec change): fresh counters, new attempt.
            st.restarts = st.disruptions = 0
            st.progress = None
            st.output_uri = None
            st.start_time = None
            st.attempt = prev.attempt + 1
        attempt = st.attempt
        current = [p for p in self.pods if p.attempt == attempt and p.fingerprint in (None, fp)]
        stale = [p for p in self.pods if p not in current]
        self.delete(stale)
        rank0 = next((p for p in current if p.rank == 0 and p.progress is not None), None)
        if rank0 is not None:
            st.progress = rank0.progress

        if policy.suspend:
            live = [p for p in current if not p.deleting]
            if live:
                st.attempt = attempt + 1
            self.delete(current)
            self.plan.requeue_after = REQUEUE_DELETING if self.plan.delete_pods else None
            return self.finish("Suspended", "Suspended", "spec.runPolicy.suspend is true")

        if st.start_time is None or prev.phase == "Suspended":
            st.start_time = rfc3339(now)
        elapsed = seconds_since(st.start_time, now) or 0.0
        finished = len(current) == self.spec.resources.nodes and all(p.phase == "Succeeded" for p in current)
        if policy.active_deadline_seconds is not None and elapsed >= policy.active_deadline_seconds and not finished:
            self.delete(current)
            return self.finish(
                "Failed", "DeadlineExceeded", f"still running after activeDeadlineSeconds={policy.active_deadline_seconds}"
            )

        if stale:
            # The previous attempt must be gone before its names are reused.
            self.plan.requeue_after = REQUEUE_DELETING
            phase: BranchPhase = "Restarting" if prev.phase in ("Running", "Restarting") else "Pending"
            return self.finish(phase, "WaitingForDeletion", f"waiting for attempt {attempt - 1} pods to be deleted")

        nodes = self.spec.resources.nodes
        if not current:
            self.plan.service = self.service()
            self.plan.create_pods = self.gang(attempt, range(nodes))
            self.event("Normal", "GangCreated", f"creating {nodes} pod(s), attempt {attempt}")
            self.plan.requeue_after = float(policy.startup_deadline_seconds)
            return self.finish("Pending", "Creating", f"creating {nodes} pod(s), attempt {attempt}")

        return self.judge(current, attempt, nodes)

    def judge(self, current: list[ObservedPod], attempt: int, nodes: int) -> BranchJobPlan:
        st, policy = self.status, self.spec.run_policy
        by_rank = {p.rank: p for p in current}
        missing = [r for r in range(nodes) if r not in by_rank]
        started = any(p.phase in ("Running", "Succeeded", "Failed") for p in current)
        disrupted = [p for p in current if p.disrupted]
        failed = [p for p in current if p.phase == "Failed" and not p.disrupted]

        if not missing and all(p.phase == "Succeeded" for p in current):
            result = by_rank[0].result
            st.output_uri = (result.output if result else None) or self.stage.output
            if st.progress is not None and st.progress.total_steps:
                st.progress = st.progress.model_copy(update={"step": st.progress.total_steps, "eta_seconds": 0.0})
            elif result is not None:
                st.progress = final_progress(result) or st.progress
            plan = self.finish("Succeeded", "Succeeded", f"output {st.output_uri}")
            self.ttl()
            return plan

        if disrupted or (missing and started):
            cause = disrupted[0] if disrupted else None
            what = (
                f"rank {cause.rank} (pod {cause.name}) was {self.disruption_word(cause)}"
                if cause is not None
                else f"rank(s) {', '.join(map(str, missing))} disappeared"
            )
            st.disruptions += 1
            return self.restart(current, attempt, "Disrupted", f"{what}; restarting the gang (disruptions do not count against backoffLimit)")

        if failed:
            cause = min(failed, key=lambda p: (p.result is None or p.result.error is None, p.rank))
            description = cause.describe_failure()
            result = cause.result
            if result is not None and result.error is not None and result.error.reason in NON_RETRYABLE_REASONS:
                self.delete([p for p in current if p.phase not in ("Succeeded", "Failed")])
                return self.finish("Failed", result.error.reason, description)
            if st.restarts >= policy.backoff_limit:
                self.delete([p for p in current if p.phase not in ("Succeeded", "Failed")])
                return self.finish(
                    "Failed", "BackoffLimitExceeded", f"{description} (after {st.restarts} restart(s), backoffLimit {policy.backoff_limit})"
                )
            st.restarts += 1
            return self.restart(current, attempt, "Restarting", f"{description}; restart {st.restarts}/{policy.backoff_limit}")

        if missing:
            # Created moments ago and not all visible yet (or a create failed): create the rest.
            self.plan.service = self.service()
            self.plan.create_pods = self.gang(attempt, missing)

        running = not missing and all(p.phase in ("Running", "Succeeded") for p in current)
        if not running:
            created = min((p.created for p in current if p.created is not None), default=None)
            waited = (self.now - created).total_seconds() if created is not None else 0.0
            if waited >= policy.startup_deadline_seconds:
                reason, detail = self.startup_cause(current, missing)
                self.delete([p for p in current if p.phase not in ("Succeeded", "Failed")])
                return self.finish(
                    "Failed", reason, f"{detail}; not all {nodes} pod(s) running {int(waited)}s after creation "
                    f"(startupDeadlineSeconds={policy.startup_deadline_seconds})"
                )
            self.plan.requeue_after = max(1.0, policy.startup_deadline_seconds - waited)
            return self.finish("Pending", "Starting", f"{sum(p.phase == 'Running' for p in current)}/{nodes} pod(s) running")

        self.plan.requeue_after = REQUEUE_RUNNING
        progress = st.progress
        text = f"step {progress.step}/{progress.total_steps}" if progress and progress.total_steps else "training"
        return self.finish("Running", "Running", f"{text}, attempt {attempt}")

    @staticmethod
    def disruption_word(pod: ObservedPod) -> str:
        if pod.phase == "Unknown":
            return "lost with its node (NodeLost)"
        if pod.reason in DISRUPTION_REASONS:
            return f"disrupted ({pod.reason})"
        if pod.disruption_target:
            return "disrupted (DisruptionTarget)"
        return "deleted while running"

    def restart(self, current: list[ObservedPod], attempt: int, reason: str, message: str) -> BranchJobPlan:
        """Delete the whole gang; the next reconcile creates attempt + 1 once it is gone."""
        self.delete(current)
        self.status.attempt = attempt + 1
        self.event("Warning", reason, message)
        self.plan.requeue_after = REQUEUE_DELETING
        return self.finish("Restarting", reason, message)

    @staticmethod
    def startup_cause(current: list[ObservedPod], missing: list[int]) -> tuple[str, str]:
        for pod in current:
            if pod.unschedulable:
                return "Unschedulable", f"pod {pod.name}: {pod.unschedulable}"
        for wanted in STARTUP_WAITING_REASONS:
            for pod in current:
                if pod.waiting_reason == wanted:
                    detail = f"pod {pod.name}: {wanted}" + (f": {pod.waiting_message}" if pod.waiting_message else "")
                    return wanted, detail
        if missing:
            return "StartupTimeout", f"rank(s) {', '.join(map(str, missing))} were never created"
        pending = [p.name for p in current if p.phase == "Pending"]
        return "StartupTimeout", f"pending: {', '.join(pending) or 'none'}"


def _stalled(prev: BranchJobStatus, generation: int, message: str, now: datetime) -> BranchJobPlan:
    conds = ConditionSet(prev.conditions, now, generation, BRANCHJOB_TYPES)
    conds.set(STALLED, "True", "InvalidSpec", message)
    conds.set(READY, "False", "InvalidSpec", message)
    conds.set(RECONCILING, "False", "InvalidSpec", message)
    conds.keep_previous()
    status = prev.model_copy(
        update={"observed_generation": generation, "phase": prev.phase or "Pending", "conditions": conds.result()}
    )
    old = find(prev.conditions, STALLED)
    already = old is not None and old.status == "True" and old.message == message
    return BranchJobPlan(status=status, events=[] if already else [Event("Warning", "InvalidSpec", message)])


def plan_branchjob(obj: BranchJob | Mapping[str, Any], pods: Sequence[ObservedPod], now: datetime) -> BranchJobPlan:
    """Plan one reconcile of a BranchJob from its pods (select by LABEL_BRANCHJOB)."""
    if isinstance(obj, BranchJob):
        return _GangPlanner(obj, obj.status or BranchJobStatus(), pods, now).run()
    raw = plain(obj)
    prev = _lenient_status(raw.get("status"))
    generation = int((raw.get("metadata") or {}).get("generation") or 1)
    parsed, report = check_manifest({k: v for k, v in raw.items() if k != "status"})
    if not isinstance(parsed, BranchJob):
        if parsed is not None:
            report.add("kind", f"expected a BranchJob, got {parsed.kind}")
        return _stalled(prev, generation, first_line([report]), now)
    return _GangPlanner(parsed, prev, pods, now).run()

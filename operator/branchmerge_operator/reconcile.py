"""Observe -> plan -> apply, for one Distillation or one BranchJob at a time.

The kopf handlers (handlers.py) only decide *when* to reconcile; this module decides
nothing either — `pipeline.plan_distillation` and `gang.plan_branchjob` do. What is here:

* `Reconciler`: at most one reconcile per object at a time, and requests that arrive while
  one runs are coalesced into one more pass (a burst of pod events costs one reconcile, not
  ten). Delayed requeues (deadlines, progress polls, error backoff) are timers on the event
  loop; a restarted operator recomputes them on its first pass.
* `Runtime`: the observed world (kopf indexes + our own recent writes), the API client,
  rank-0 progress read from pod logs, and the metrics bookkeeping.
* `apply_*`: idempotent application of a plan — deterministic names, AlreadyExists and
  NotFound are success, deletes carry the uid they meant, and the status is written only
  when it changes (so a quiet operator makes no writes at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from . import metrics, workloads
from .api import BranchJob
from .conditions import Event, parse_time
from .gang import BranchJobPlan, ObservedPod, plan_branchjob
from .kube import ApiError, KubeClient
from .observe import (
    Obj,
    Overlay,
    ProgressCache,
    as_applied,
    job_pod_message,
    last_progress,
    merge_patch_into,
    meta,
    owned_by,
    owner_view,
    rank0,
    redact,
)
from .pipeline import (
    Observed,
    ObservedBranchJob,
    ObservedJob,
    Plan,
    StageJob,
    parse_result,
    plan_distillation,
)

log = logging.getLogger("branchmerge.operator")

Key = tuple[str, str]  # (namespace, name)

#: A Job that completed but whose pod result is not visible yet is waited for this long
#: (its pod's final status usually arrives first; losing the scores would be sticky).
RESULT_GRACE_SECONDS = 30.0
#: Error backoff of a failing reconcile: 1, 2, 4 … seconds, at most this.
MAX_BACKOFF = 120.0

# kopf index names (the kwargs handlers receive); handlers.py registers functions by these names.
IDX_DISTILLATIONS = "bm_distillations"
IDX_BRANCHJOBS = "bm_branchjobs"
IDX_JOBS = "bm_jobs"
IDX_PODS = "bm_pods"


class LogReader(Protocol):
    def __call__(self, namespace: str, pod: str, container: str) -> Awaitable[str]: ...


@dataclass
class OperatorConfig:
    """Settings of one operator process (from `branchmerge operator` flags)."""

    namespaces: list[str] = field(default_factory=list)
    clusterwide: bool = True
    metrics_port: int | None = 8080
    metrics_address: str = "0.0.0.0"
    liveness: str | None = None
    progress_interval: float = 30.0
    resync_interval: float = 60.0
    peering: str | None = None
    post_events: bool = True
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    #: Where rank-0 logs come from (default: the API's pods/log); tests substitute their kubelet's files.
    log_reader: LogReader | None = None


# --------------------------------------------------------------------------- coalescing


@dataclass
class _KeyState:
    running: bool = False
    dirty: bool = False
    failures: int = 0
    timer: asyncio.TimerHandle | None = None


class Reconciler:
    """Serialises and coalesces reconciles per key; schedules requeues.

    ``fn(key)`` returns the delay of the next safety-net pass (None: only on events) and
    raises on transient failures (retried with exponential backoff).
    """

    def __init__(self, kind: str, fn: Callable[[Key], Awaitable[float | None]]) -> None:
        self.kind = kind
        self._fn = fn
        self._states: dict[Key, _KeyState] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _state(self, key: Key) -> _KeyState:
        return self._states.setdefault(key, _KeyState())

    @property
    def pending(self) -> int:
        return sum(1 for s in self._states.values() if s.running or s.dirty)

    async def run(self, key: Key) -> BaseException | None:
        """Reconcile ``key`` now (or make the running pass go once more). Returns the error of
        the last pass this call ran, so change handlers can hand it to kopf as a retry."""
        st = self._state(key)
        st.dirty = True
        if st.running:
            return None
        st.running = True
        error: BaseException | None = None
        try:
            while st.dirty:
                st.dirty = False
                error = await self._pass(key, st)
        finally:
            st.running = False
        return error

    async def _pass(self, key: Key, st: _KeyState) -> BaseException | None:
        started = asyncio.get_running_loop().time()
        try:
            delay = await self._fn(key)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            st.failures += 1
            backoff = min(MAX_BACKOFF, 2.0 ** (st.failures - 1))
            metrics.RECONCILES.labels(self.kind, "error").inc()
            metrics.RECONCILE_ERRORS.labels(self.kind, type(e).__name__).inc()
            log.warning("%s %s/%s: reconcile failed (retry in %.0fs): %s", self.kind, *key, backoff, redact(str(e)))
            self.requeue(key, backoff)
            return e
        finally:
            metrics.RECONCILE_SECONDS.labels(self.kind).observe(asyncio.get_running_loop().time() - started)
        st.failures = 0
        metrics.RECONCILES.labels(self.kind, "ok").inc()
        self.requeue(key, delay)
        return None

    def trigger(self, key: Key) -> None:
        """Fire and forget: a reconcile of ``key`` will start (or run once more) soon."""
        st = self._state(key)
        if st.running:
            st.dirty = True
            return
        task = asyncio.get_running_loop().create_task(self.run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def requeue(self, key: Key, delay: float | None) -> None:
        """Replace the pending requeue of ``key`` (each pass recomputes it)."""
        st = self._state(key)
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if delay is not None:
            st.timer = asyncio.get_running_loop().call_later(max(0.05, delay), self.trigger, key)

    def forget(self, key: Key) -> None:
        st = self._states.pop(key, None)
        if st is not None and st.timer is not None:
            st.timer.cancel()

    async def close(self) -> None:
        for st in self._states.values():
            if st.timer is not None:
                st.timer.cancel()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# --------------------------------------------------------------------------- runtime


class Runtime:
    """Everything one operator process shares between handlers (created at startup)."""

    def __init__(
        self,
        config: OperatorConfig,
        client: KubeClient | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        log_reader: LogReader | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.clock = clock or (lambda: datetime.now(UTC))
        self.overlay = Overlay()
        self.progress = ProgressCache(config.progress_interval)
        self.indexes: dict[str, Any] = {}
        self.log_reader: LogReader = log_reader or config.log_reader or self._api_log
        self._log_failures: set[Key] = set()
        self._active: dict[tuple[str, str, str], str] = {}
        self._phases: dict[tuple[str, str, str], str] = {}
        self.distillations = Reconciler("Distillation", self.reconcile_distillation)
        self.branchjobs = Reconciler("BranchJob", self.reconcile_branchjob)

    # ------------------------------------------------------------------ observing

    def bind(self, kwargs: Mapping[str, Any]) -> None:
        """Remember kopf's index objects (every handler receives them; they are long-lived)."""
        for name in (IDX_DISTILLATIONS, IDX_BRANCHJOBS, IDX_JOBS, IDX_PODS):
            if name in kwargs:
                self.indexes[name] = kwargs[name]

    def _values(self, index: str, key: Any) -> list[Obj]:
        idx = self.indexes.get(index)
        if idx is None:
            return []
        store = idx.get(key)
        return list(store) if store is not None else []

    def _api(self) -> KubeClient:
        if self.client is None:
            raise kopf.TemporaryError("not logged in to the API server yet", delay=1)
        return self.client

    async def _api_log(self, namespace: str, pod: str, container: str) -> str:
        return await self._api().pod_log(namespace, pod, container=container)

    async def _rank0_progress(self, key: Key, pods: list[Obj], attempt: int) -> tuple[str | None, Any]:
        """(uid of rank 0, its last progress), reading its log when the cache says it is due."""
        pod = rank0(pods, attempt)
        if pod is None:
            return None, None
        uid = meta(pod).get("uid")
        if (pod.get("status") or {}).get("phase") == "Running" and self.progress.due(key, uid):
            progress = None
            try:
                progress = last_progress(await self.log_reader(key[0], str(meta(pod)["name"]), workloads.CONTAINER))
                self._log_failures.discard(key)
            except Exception as e:  # logs are best effort: a kubelet may not serve them
                if key not in self._log_failures:
                    log.info("BranchJob %s/%s: cannot read rank-0 log for progress: %s", *key, redact(str(e)))
                    self._log_failures.add(key)
            self.progress.store(key, uid, progress)
        return uid, self.progress.get(key, uid)

    # ------------------------------------------------------------------ bookkeeping

    def _track(self, kind: str, key: Key, phase: str | None, active: dict[str, bool]) -> None:
        ident = (kind, *key)
        if phase is None:
            self._phases.pop(ident, None)
        else:
            self._phases[ident] = phase
        for stage, on in active.items():
            sk = (f"{kind}:{stage}", *key)
            if on:
                self._active[sk] = stage
            else:
                self._active.pop(sk, None)
        counts: dict[str, int] = {"branch": 0, "merge": 0, "eval": 0}
        for stage in self._active.values():
            counts[stage] = counts.get(stage, 0) + 1
        for stage, n in counts.items():
            metrics.ACTIVE_STAGES.labels(stage).set(n)
        phases: dict[tuple[str, str], int] = {}
        for (k, _, _), p in self._phases.items():
            phases[(k, p)] = phases.get((k, p), 0) + 1
        metrics.PHASES.clear()
        for (k, p), n in phases.items():
            metrics.PHASES.labels(k, p).set(n)

    def _emit(self, body: Obj, events: Iterable[Event]) -> None:
        if not self.config.post_events:
            return
        target = owner_view(body)
        for ev in events:
            message = redact(ev.message, 1024) or ""
            metrics.EVENTS.labels(ev.type, ev.reason).inc()
            log.info("%s %s/%s: %s %s: %s", body.get("kind"), meta(body).get("namespace"), meta(body).get("name"),
                     ev.type, ev.reason, message)  # fmt: skip
            with contextlib.suppress(LookupError):  # outside kopf (unit tests): logging is enough
                kopf.event(target, type=ev.type, reason=ev.reason, message=message)  # type: ignore[arg-type]

    async def _create(self, kind: str, namespace: str, body: Obj, owner: Obj) -> None:
        kopf.adopt(body, owner=owner_view(owner))  # type: ignore[arg-type]
        try:
            created = await self._api().create(kind, namespace, body)
        except ApiError as e:
            if e.status == 409:  # created by an earlier pass or an earlier operator: fine
                return
            raise
        self.overlay.wrote(kind, created)

    async def _delete(self, kind: str, namespace: str, name: str, uid: str | None) -> None:
        await self._api().delete(kind, namespace, name, uid=uid, propagation="Background")
        self.overlay.deleted(kind, namespace, name, uid)

    async def _write_status(self, kind: str, body: Obj, patch: dict[str, Any]) -> Obj:
        """Patch the status subresource unless it would change nothing; returns the freshest body."""
        current = body.get("status") or {}
        if merge_patch_into(current, patch) == current:
            return body
        m = meta(body)
        fresh = await self._api().merge_patch(kind, str(m["namespace"]), str(m["name"]), {"status": patch}, subresource="status")
        self.overlay.wrote(kind, fresh)
        return fresh

    # ------------------------------------------------------------------ Distillation

    def _latest(self, kind: str, index: str, index_key: Any, key: Key) -> Obj | None:
        seen = self._values(index, index_key)
        return self.overlay.one(kind, key[0], key[1], seen[0] if seen else None)

    def observe_distillation(self, key: Key, body: Obj, now: datetime) -> tuple[Observed, dict[str, Obj], float | None]:
        """Children of one Distillation: its BranchJobs and Jobs (owned by it), with each Job's
        result from its pod's termination message."""
        ns, name = key
        bjs = self.overlay.many("BranchJob", ns, self._values(IDX_BRANCHJOBS, ("dist", ns, name)),
                                lambda o: owned_by(o, "Distillation", name))  # fmt: skip
        bjs = [b for b in bjs if owned_by(b, "Distillation", name)]
        jobs = self.overlay.many("Job", ns, self._values(IDX_JOBS, (ns, name)), lambda o: owned_by(o, "Distillation", name))
        jobs = [j for j in jobs if owned_by(j, "Distillation", name)]
        observed_jobs: list[ObservedJob] = []
        wait: float | None = None
        for job in jobs:
            job_name = str(meta(job)["name"])
            phase = ObservedJob.from_object(job).phase
            message = None
            if phase != "Active":
                message = job_pod_message(self._values(IDX_PODS, (ns, "Job", job_name)), phase)
            obs = ObservedJob.from_object(job, result=message)
            if phase == "Succeeded" and parse_result(message) is None:
                done = parse_time((job.get("status") or {}).get("completionTime"))
                if done is not None and (now - done).total_seconds() < RESULT_GRACE_SECONDS:
                    obs = ObservedJob(name=obs.name, stage=obs.stage, fingerprint=obs.fingerprint, phase="Active")
                    wait = 2.0
            observed_jobs.append(obs)
        by_name = {str(meta(o)["name"]): o for o in [*bjs, *jobs]}
        observed = Observed(branch_jobs=[ObservedBranchJob.from_object(b) for b in bjs], jobs=observed_jobs)
        return observed, by_name, wait

    async def reconcile_distillation(self, key: Key) -> float | None:
        body = self._latest("Distillation", IDX_DISTILLATIONS, key, key)
        if body is None or meta(body).get("deletionTimestamp"):
            self._track("Distillation", key, None, {"merge": False, "eval": False})
            self.distillations.forget(key)
            return None
        now = self.clock()
        observed, children, wait = self.observe_distillation(key, body, now)
        plan = plan_distillation(as_applied(body), observed, now)
        await self.apply_distillation(body, plan, children)
        delay = plan.requeue_after
        if wait is not None:
            delay = wait if delay is None else min(delay, wait)
        return delay

    async def apply_distillation(self, body: Obj, plan: Plan, children: Mapping[str, Obj]) -> None:
        ns = str(meta(body)["namespace"])
        for ref in plan.delete:
            uid = meta(children.get(ref.name) or {}).get("uid")
            await self._delete(ref.kind, ns, ref.name, uid)
        creates: list[Awaitable[None]] = []
        for child in plan.create:
            if isinstance(child, StageJob):
                creates.append(self._create("Job", ns, workloads.stage_job(child, namespace=ns), body))
            else:
                creates.append(self._create("BranchJob", ns, workloads.branchjob_body(child), body))
        await _gather(creates)
        for p in plan.patch:
            try:
                patched = await self._api().merge_patch(p.kind, ns, p.name, p.patch)
            except ApiError as e:
                if e.status != 404:
                    raise
                continue
            self.overlay.wrote(p.kind, patched)
        before = body.get("status") or {}
        fresh = await self._write_status("Distillation", body, plan.status_patch())
        self._emit(fresh, plan.events)
        status = plan.status
        self._observe_stage_durations(before, status.model_dump(by_alias=True, mode="json"), children)
        self._track(
            "Distillation",
            (ns, str(meta(body)["name"])),
            status.phase,
            {
                "merge": bool(status.merge and status.merge.phase == "Running"),
                "eval": bool(status.evaluation and status.evaluation.phase == "Running"),
            },
        )

    def _observe_stage_durations(self, before: Mapping[str, Any], after: Mapping[str, Any], children: Mapping[str, Obj]) -> None:
        """Merge/eval durations from their Jobs' start and completion, once per transition."""
        for stage, field_name in (("merge", "merge"), ("eval", "evaluation")):
            old = before.get(field_name) or {}
            new = after.get(field_name) or {}
            phase = new.get("phase")
            if phase not in ("Succeeded", "Failed") or old.get("phase") == phase:
                continue
            job = children.get(str(new.get("jobName") or ""))
            st = (job or {}).get("status") or {}
            start = parse_time(st.get("startTime"))
            end = parse_time(st.get("completionTime")) or self.clock()
            if start is not None:
                metrics.STAGE_SECONDS.labels(stage, phase).observe(max(0.0, (end - start).total_seconds()))

    # ------------------------------------------------------------------ BranchJob

    async def reconcile_branchjob(self, key: Key) -> float | None:
        ns, name = key
        body = self._latest("BranchJob", IDX_BRANCHJOBS, ("name", ns, name), key)
        if body is None or meta(body).get("deletionTimestamp"):
            self._track("BranchJob", key, None, {"branch": False})
            self.progress.drop(key)
            self.branchjobs.forget(key)
            return None
        pods = self.overlay.many("Pod", ns, self._values(IDX_PODS, (ns, "BranchJob", name)), lambda o: owned_by(o, "BranchJob", name))
        attempt = int((body.get("status") or {}).get("attempt") or 0)
        uid0, progress = await self._rank0_progress(key, pods, attempt)
        observed = [ObservedPod.from_object(p, progress if uid0 and meta(p).get("uid") == uid0 else None) for p in pods]
        plan = plan_branchjob(as_applied(body), observed, self.clock())
        await self.apply_branchjob(body, plan, {str(meta(p)["name"]): p for p in pods})
        delay = plan.requeue_after
        if plan.status.phase == "Running":
            delay = min(delay or self.config.progress_interval, self.config.progress_interval)
        return delay

    async def apply_branchjob(self, body: Obj, plan: BranchJobPlan, pods: Mapping[str, Obj]) -> None:
        ns, name = str(meta(body)["namespace"]), str(meta(body)["name"])
        await _gather(self._delete("Pod", ns, p, meta(pods.get(p) or {}).get("uid")) for p in plan.delete_pods)
        if plan.delete_service and plan.service is None:
            await self._delete("Service", ns, name, None)
        if plan.service is not None:
            await self._create("Service", ns, workloads.gang_service(plan.service, namespace=ns), body)
        if plan.create_pods and plan.stage is not None:
            try:
                spec = BranchJob.model_validate({k: v for k, v in body.items() if k != "status"}).spec
            except ValidationError as e:  # the planner validated it; a race with an edit
                raise kopf.TemporaryError(f"BranchJob changed while reconciling: {e}", delay=1) from e
            settings = workloads.settings_for_branchjob(spec)
            stage = plan.stage
            # The whole gang at once: a half-created gang would hold GPUs waiting for the rest.
            await _gather(
                self._create("Pod", ns, workloads.gang_pod(gp, namespace=ns, stage=stage, settings=settings), body)
                for gp in plan.create_pods
            )
        before = body.get("status") or {}
        fresh = await self._write_status("BranchJob", body, plan.status_patch())
        self._emit(fresh, plan.events)
        after = plan.status
        restarts = after.restarts - int(before.get("restarts") or 0)
        disruptions = after.disruptions - int(before.get("disruptions") or 0)
        if restarts > 0:
            metrics.GANG_RESTARTS.labels("failure").inc(restarts)
        if disruptions > 0:
            metrics.GANG_RESTARTS.labels("disruption").inc(disruptions)
        if after.phase in ("Succeeded", "Failed") and before.get("phase") != after.phase:
            start = parse_time(after.start_time)
            end = parse_time(after.completion_time) or self.clock()
            if start is not None:
                metrics.STAGE_SECONDS.labels("branch", after.phase).observe(max(0.0, (end - start).total_seconds()))
        self._track("BranchJob", (ns, name), after.phase,
                    {"branch": after.phase in ("Pending", "Running", "Restarting")})  # fmt: skip

    async def close(self) -> None:
        await self.distillations.close()
        await self.branchjobs.close()
        if self.client is not None:
            await self.client.close()


async def _gather(aws: Iterable[Awaitable[None]]) -> None:
    """Run writes concurrently; raise the first error after all have finished."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r

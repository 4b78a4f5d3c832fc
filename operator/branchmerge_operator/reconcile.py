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
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from . import metrics, workloads
from .api import BranchJob, BranchJobStatus, Distillation, DistillationStatus, check_manifest
from .conditions import Event, parse_time
from .gang import BranchJobPlan, ObservedPod, plan_branchjob
from .kube import ApiError, KubeClient
from .observe import (
    LAST_APPLIED,
    Obj,
    Overlay,
    ProgressCache,
    as_applied,
    essence,
    job_pod_message,
    last_progress,
    merge_patch_into,
    meta,
    owned_by,
    owner_view,
    rank0,
    redact,
    resource_version,
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
#: How long a child's event waits for more before its parent reconciles (see Reconciler.trigger).
DEBOUNCE_PARENT = 1.0
DEBOUNCE_GANG = 0.3
#: Narrative-only status changes are written at most this often per object.
STATUS_MIN_INTERVAL = 2.0
#: Status writes in flight at once (of kube.CONNECTIONS): in a burst, creating children — what
#: the training waits on — goes first, and status patches queue for one of these slots.
STATUS_WRITE_SLOTS = 4
#: Validated specs kept (one per object generation).
PARSE_CACHE_SIZE = 4096
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
    due: float = 0.0  # loop time the timer fires at


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
        if st.timer is not None:  # reconciling now: a pending requeue is moot (the pass sets a new one)
            st.timer.cancel()
            st.timer = None
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

    def trigger(self, key: Key, debounce: float = 0.0) -> None:
        """Fire and forget: a reconcile of ``key`` starts within ``debounce`` seconds (or the
        running one goes once more). Children's events are debounced: a burst of them — a
        gang's pods being scheduled and started, three branches finishing — folds into one
        pass and one status write instead of one per event."""
        st = self._state(key)
        if st.running:
            st.dirty = True
            return
        loop = asyncio.get_running_loop()
        if debounce > 0:
            if st.timer is None or st.due > loop.time() + debounce:
                self._schedule(key, st, debounce)
            return
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        task = loop.create_task(self.run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self, key: Key, st: _KeyState, delay: float) -> None:
        if st.timer is not None:
            st.timer.cancel()
        loop = asyncio.get_running_loop()
        st.due = loop.time() + delay
        st.timer = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        st = self._states.get(key)
        if st is not None:
            st.timer = None
        self.trigger(key)

    def requeue(self, key: Key, delay: float | None) -> None:
        """Replace the pending requeue of ``key`` (each pass recomputes it)."""
        st = self._state(key)
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if delay is not None:
            self._schedule(key, st, max(0.05, delay))

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
        self._active: set[tuple[str, str, str]] = set()
        self._active_counts: Counter[str] = Counter()
        self._phases: dict[tuple[str, str, str], str] = {}
        self._phase_counts: Counter[tuple[str, str]] = Counter()
        self._parsed: dict[Any, Distillation | BranchJob | bool] = {}
        self._background: list[asyncio.Task[None]] = []
        self._status_rv: dict[tuple[str, str, str], int] = {}
        self._status_written: dict[tuple[str, str, str], float] = {}
        self._status_slots = asyncio.Semaphore(STATUS_WRITE_SLOTS)
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

    def own_write(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """Whether a watch event only echoes this object's own reconciler's last status write
        (nothing new to reconcile). A creation by the parent is *not* an echo: the child's
        reconciler has yet to see it."""
        rv = resource_version(body)
        return rv is not None and self._status_rv.get((kind, namespace, name)) == rv

    def known(self, index: str) -> list[Key]:
        """Keys of an index whose keys are (namespace, name)."""
        idx = self.indexes.get(index)
        return [k for k in (idx or {}) if isinstance(k, tuple) and len(k) == 2]

    def known_branchjobs(self) -> list[Key]:
        idx = self.indexes.get(IDX_BRANCHJOBS)
        return [(k[1], k[2]) for k in (idx or {}) if isinstance(k, tuple) and len(k) == 3 and k[0] == "name"]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task owned by this runtime (cancelled on close)."""
        self._background.append(asyncio.get_running_loop().create_task(coro))

    def branchjobs_of(self, namespace: str, distillation: str) -> list[str]:
        return [str(meta(b).get("name")) for b in self._values(IDX_BRANCHJOBS, ("dist", namespace, distillation))]

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
        """Keep the phase and active-stage gauges exact, in O(1) per reconcile."""
        ident = (kind, *key)
        old = self._phases.get(ident)
        if old != phase:
            if old is not None:
                self._phase_counts[(kind, old)] -= 1
                metrics.PHASES.labels(kind, old).set(self._phase_counts[(kind, old)])
            if phase is None:
                self._phases.pop(ident, None)
            else:
                self._phases[ident] = phase
                self._phase_counts[(kind, phase)] += 1
                metrics.PHASES.labels(kind, phase).set(self._phase_counts[(kind, phase)])
        for stage, on in active.items():
            sk = (stage, *key)
            if on and sk not in self._active:
                self._active.add(sk)
                self._active_counts[stage] += 1
            elif not on and sk in self._active:
                self._active.discard(sk)
                self._active_counts[stage] -= 1
            else:
                continue
            metrics.ACTIVE_STAGES.labels(stage).set(self._active_counts[stage])

    def _emit(self, body: Obj, events: Iterable[Event]) -> None:
        """Post a plan's events; several with the same type and reason (three BranchJobs
        created at once) become one event listing them — one API write instead of three."""
        if not self.config.post_events:
            return
        target = owner_view(body)
        grouped: dict[tuple[str, str], list[str]] = {}
        for ev in events:
            grouped.setdefault((ev.type, ev.reason), []).append(ev.message)
        for (type_, reason), messages in grouped.items():
            ev = Event(type_, reason, "; ".join(messages))  # type: ignore[arg-type]
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
            if e.status == 403 and "being terminated" in e.message:  # its namespace is going away
                return
            raise
        self.overlay.wrote(kind, created)

    async def _delete(self, kind: str, namespace: str, name: str, uid: str | None) -> None:
        await self._api().delete(kind, namespace, name, uid=uid, propagation="Background")
        self.overlay.deleted(kind, namespace, name, uid)

    async def _write_status(self, kind: str, body: Obj, patch: dict[str, Any]) -> tuple[Obj, float | None]:
        """Patch the status subresource unless it would change nothing. Returns the freshest
        body, and — when the write was deferred — in how many seconds to try again.

        A change that is only narrative (messages, reasons, progress; see observe.essence)
        within STATUS_MIN_INTERVAL of the previous write waits for the next pass: a gang going
        Creating -> Starting -> Running in a second costs one write, not three. Anything a
        decision depends on (phase, attempt, restarts, outputs, condition statuses) is
        written at once, so the next plan never starts from a stale decision.

        At most STATUS_WRITE_SLOTS status writes are in flight; the others wait for a slot.
        On a loaded API server a burst of status patches competed with the creates of
        children for the same server: with the limit, a 100-Distillation burst's children
        all exist 30–40 % sooner and the statuses follow a few seconds later. Waiting is
        safe: the pass still holds its object (Reconciler), so no plan of this object runs
        before its status is written.
        """
        current = body.get("status") or {}
        after = merge_patch_into(current, patch)
        if after == current:
            return body, None
        m = meta(body)
        key = (kind, str(m["namespace"]), str(m["name"]))
        now = asyncio.get_running_loop().time()
        since = now - self._status_written.get(key, float("-inf"))
        if current and since < STATUS_MIN_INTERVAL and essence(after) == essence(current):
            return body, STATUS_MIN_INTERVAL - since
        async with self._status_slots:
            fresh = await self._api().merge_patch(kind, key[1], key[2], {"status": patch}, subresource="status")
        self._status_written[key] = asyncio.get_running_loop().time()
        self.overlay.wrote(kind, fresh)
        rv = resource_version(fresh)
        if rv is not None:
            self._status_rv[key] = rv
        return fresh, None

    # ------------------------------------------------------------------ parsing

    def _model(self, body: Obj) -> Distillation | BranchJob | Obj:
        """The object to plan with: a validated model (cached per uid, generation and applied
        configuration — validating a spec was most of a reconcile's CPU time, and a spec only
        changes with the generation), or the raw object when it is invalid, so that the planner
        reports it as Stalled."""
        m = meta(body)
        annotations = m.get("annotations") or {}
        labels = m.get("labels") or {}
        key = (body.get("kind"), m.get("uid"), m.get("generation"), hash(annotations.get(LAST_APPLIED)),
               hash(tuple(sorted(labels.items()))))  # fmt: skip
        parsed = self._parsed.get(key)
        if parsed is None:
            raw = as_applied(body)
            model, _ = check_manifest({k: v for k, v in raw.items() if k != "status"})
            parsed = model if raw is body and model is not None else False
            if len(self._parsed) >= PARSE_CACHE_SIZE:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[key] = parsed
        if parsed is False:
            return as_applied(body)
        assert isinstance(parsed, Distillation | BranchJob)
        status_type = DistillationStatus if isinstance(parsed, Distillation) else BranchJobStatus
        try:
            status: Any = status_type.model_validate(body.get("status") or {})
        except ValidationError:  # read leniently, as the planner does: rebuilt on the next write
            status = status_type()
        return parsed.model_copy(update={"status": status})

    # ------------------------------------------------------------------ Distillation

    def _latest(self, kind: str, index: str, index_key: Any, key: Key) -> Obj | None:
        seen = self._values(index, index_key)
        return self.overlay.one(kind, key[0], key[1], seen[0] if seen else None)

    def observe_distillation(self, key: Key, body: Obj, now: datetime) -> tuple[Observed, dict[str, Obj], float | None]:
        """Children of one Distillation: its BranchJobs and Jobs (owned by it), with each Job's
        result from its pod's termination message."""
        ns, name = key
        bjs = self.overlay.many("BranchJob", ns, self._values(IDX_BRANCHJOBS, ("dist", ns, name)), ("Distillation", name))
        bjs = [b for b in bjs if owned_by(b, "Distillation", name)]
        jobs = self.overlay.many("Job", ns, self._values(IDX_JOBS, (ns, name)), ("Distillation", name))
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
            self._status_rv.pop(("Distillation", *key), None)
            self._status_written.pop(("Distillation", *key), None)
            self.distillations.forget(key)
            return None
        now = self.clock()
        observed, children, wait = self.observe_distillation(key, body, now)
        plan = plan_distillation(self._model(body), observed, now)  # type: ignore[arg-type]
        deferred = await self.apply_distillation(body, plan, children)
        return _soonest(plan.requeue_after, wait, deferred)

    async def apply_distillation(self, body: Obj, plan: Plan, children: Mapping[str, Obj]) -> float | None:
        """Apply a plan; returns a requeue delay when the status write was deferred."""
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
        fresh, deferred = await self._write_status("Distillation", body, plan.status_patch())
        if deferred is None:  # events describe the transition the written status records
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
        return deferred

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
            self._status_rv.pop(("BranchJob", *key), None)
            self._status_written.pop(("BranchJob", *key), None)
            self.progress.drop(key)
            self.branchjobs.forget(key)
            return None
        pods = self._gang_pods(ns, name)
        attempt = int((body.get("status") or {}).get("attempt") or 0)
        uid0, progress = await self._rank0_progress(key, pods, attempt)
        observed = [ObservedPod.from_object(p, progress if uid0 and meta(p).get("uid") == uid0 else None) for p in pods]
        model = self._model(body)
        now = self.clock()
        plan = plan_branchjob(model, observed, now)  # type: ignore[arg-type]

        def replan(settled: Obj) -> BranchJobPlan:
            fresh = [ObservedPod.from_object(p, progress if uid0 and meta(p).get("uid") == uid0 else None)
                     for p in self._gang_pods(ns, name)]  # fmt: skip
            return plan_branchjob(self._model(settled), fresh, now)  # type: ignore[arg-type]

        deferred, plan = await self.apply_branchjob(body, plan, {str(meta(p)["name"]): p for p in pods},
                                                    model if isinstance(model, BranchJob) else None, replan)
        poll = self.config.progress_interval if plan.status.phase == "Running" else None
        return _soonest(plan.requeue_after, poll, deferred)

    def _gang_pods(self, ns: str, name: str) -> list[Obj]:
        return self.overlay.many("Pod", ns, self._values(IDX_PODS, (ns, "BranchJob", name)), ("BranchJob", name))

    async def apply_branchjob(
        self,
        body: Obj,
        plan: BranchJobPlan,
        pods: Mapping[str, Obj],
        model: BranchJob | None = None,
        replan: Callable[[Obj], BranchJobPlan] | None = None,
    ) -> tuple[float | None, BranchJobPlan]:
        """Apply a plan. Returns a requeue delay when the status write was deferred, and the
        plan whose status was written.

        A plan that created the gang is followed, before its status is written, by a plan of
        the world as it is after those creates (``replan``: the created pods are in the
        read-your-writes overlay; the status the first plan decided — attempt, restarts — is
        its starting point). Without that, the status first says "creating N pod(s)" and,
        a moment later when the pods' watch events arrive, "0/N pod(s) running": two status
        writes, two watch events and a parent re-plan for one transition. The first plan's
        events are kept; the settled plan is used only when it asks for no further changes.
        """
        ns, name = str(meta(body)["namespace"]), str(meta(body)["name"])
        await _gather(self._delete("Pod", ns, p, meta(pods.get(p) or {}).get("uid")) for p in plan.delete_pods)
        if plan.delete_service and plan.service is None:
            await self._delete("Service", ns, name, None)
        creates: list[Awaitable[None]] = []
        if plan.service is not None:
            creates.append(self._create("Service", ns, workloads.gang_service(plan.service, namespace=ns), body))
        if plan.create_pods and plan.stage is not None:
            if model is None:  # the planner created pods, so the spec was valid
                raise kopf.TemporaryError("BranchJob spec not parsed; retrying", delay=1)
            settings = workloads.settings_for_branchjob(model.spec)
            stage = plan.stage
            creates += [
                self._create("Pod", ns, workloads.gang_pod(gp, namespace=ns, stage=stage, settings=settings), body)
                for gp in plan.create_pods
            ]
        # The whole gang and its Service at once: a half-created gang would hold GPUs waiting
        # for the rest, and DNS for the ranks exists as soon as both exist (well before any
        # container starts).
        await _gather(creates)
        before = body.get("status") or {}
        events = list(plan.events)
        if creates and replan is not None and not plan.delete_pods and not plan.delete_service:
            settled = replan({**body, "status": merge_patch_into(before, plan.status_patch())})
            if not (settled.create_pods or settled.delete_pods or settled.service or settled.delete_service):
                plan, events = settled, [*events, *settled.events]
        fresh, deferred = await self._write_status("BranchJob", body, plan.status_patch())
        if deferred is None:
            self._emit(fresh, events)
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
        return deferred, plan

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.distillations.close()
        await self.branchjobs.close()
        if self.client is not None:
            await self.client.close()


def _soonest(*delays: float | None) -> float | None:
    given = [d for d in delays if d is not None]
    return min(given) if given else None


async def _gather(aws: Iterable[Awaitable[None]]) -> None:
    """Run writes concurrently; raise the first error after all have finished."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r

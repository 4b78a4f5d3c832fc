"""kopf handlers: *when* to reconcile. What to do is the planner's job, how to apply it is
reconcile.py's.

Level-based: every trigger — the resource created, resumed after an operator restart or
changed, a child's event (BranchJob, Job, Pod with our labels), a delayed requeue, the
safety-net timer — leads to the same idempotent reconcile of the whole object from what is
observed now. Children are observed through kopf indexes, which kopf fills completely before
any handler runs, so a restarted operator never mistakes "not listed yet" for "gone".

All handlers are coroutines: kopf would run plain functions in a thread pool, and the
reconcilers live on the event loop.

Import this module to register the handlers (``kopf run -m branchmerge_operator.handlers``
or ``branchmerge operator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any, cast

import kopf

from . import metrics
from .kube import Endpoint, KubeClient
from .naming import GROUP, LABEL_DISTILLATION, VERSION
from .observe import pod_owner_key, slim, slim_pod
from .reconcile import (
    DEBOUNCE_GANG,
    DEBOUNCE_PARENT,
    IDX_DISTILLATIONS,
    OperatorConfig,
    Runtime,
)

log = logging.getLogger("branchmerge.operator")

DISTILLATIONS = (GROUP, VERSION, "distillations")
BRANCHJOBS = (GROUP, VERSION, "branchjobs")
#: Children are selected by this label (kopf filters client-side; see docs/operator.md).
MANAGED = {"app.kubernetes.io/managed-by": "branchmerge"}
FINALIZER = f"{GROUP}/finalizer"
#: Safety-net resync of every resource (events and requeues drive everything else).
RESYNC_SECONDS = 60.0

#: Set by `branchmerge operator` (or a test) before the operator starts.
CONFIG = OperatorConfig(metrics_port=None)


class _State:
    gc_tuned = False
    runtime: Runtime | None = None
    endpoint: Endpoint | None = None
    metrics_port: int | None = None


_state = _State()


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once per process, when the operator starts: move everything allocated so far (kopf,
    pydantic's compiled schemas, the API models — all of it lives as long as the process) out
    of the cyclic garbage collector's reach, and collect the young generation less often.

    Each watch event allocates thousands of short-lived dicts; with CPython's defaults the
    collector ran a full collection over the whole heap every few hundred events — a quarter
    of the operator's CPU in a burst. Reference counting still frees almost everything at
    once; only garbage in reference cycles waits for the (now rarer) collections.
    """
    if _state.gc_tuned:
        return
    _state.gc_tuned = True
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def current_runtime() -> Runtime:
    if _state.runtime is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _state.runtime


def _rt(kwargs: dict[str, Any]) -> Runtime:
    rt = current_runtime()
    rt.bind(kwargs)
    return rt


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: our finalizer and annotation names, watch timeouts, peering."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = EssenceStorage(prefix=GROUP, key="last-handled-configuration")
    # Server-side watch timeout below any load balancer's idle cut-off; the client gives up
    # a little later, then kopf re-watches from the last resourceVersion.
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.enabled = config.post_events
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    # One replica by default (Deployment strategy Recreate); peering only when named.
    settings.peering.standalone = config.peering is None
    if config.peering is not None:
        settings.peering.name = config.peering
        settings.peering.mandatory = True
    settings.execution.max_workers = 4
    # Namespaced mode runs without a ClusterRole (manifests/rbac/namespaced): kopf's discovery
    # of namespaces and CRDs would get 403s, which kopf retries for ~54 s before falling back
    # to the named namespaces — a minute before the first reconcile. Discovery is needed only
    # to follow namespace patterns ('team-*'), so it stays on when one is given.
    if not config.clusterwide and all(specific_namespace(ns) for ns in config.namespaces):
        settings.scanning.disabled = True


def specific_namespace(pattern: str) -> bool:
    """A namespace name, not a kopf pattern (globs, negations, lists)."""
    return not any(c in pattern for c in "!*?,")


#: (group, kind) of resources with kopf change handlers (create/update/resume): the only ones
#: whose essence kopf uses. None at present: every resource is driven by events.
CHANGE_HANDLED_KINDS: frozenset[tuple[str, str]] = frozenset()
_ESSENCE_METADATA = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences")


class EssenceStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base storage, without its largest per-event CPU cost.

    On *every* watch event of every watched resource, kopf builds the object's "essence" (what
    change handlers diff) by deep-copying the whole body — managedFields, status, a pod's spec —
    and then dropping all but the spec, labels and annotations. In a burst that was a quarter of
    the operator's CPU. The essence is only used for resources with change handlers
    (``tracked``), and there it is built from the fields it keeps (the result is identical to
    kopf's); other resources (event handlers and indexes only) get an empty one.
    """

    def __init__(self, *, tracked: frozenset[tuple[str, str]] = CHANGE_HANDLED_KINDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tracked = tracked

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        group = str(body.get("apiVersion") or "").partition("/")[0]
        if (group, body.get("kind")) not in self.tracked:
            return kopf.BodyEssence()
        m = body.get("metadata") or {}
        light = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        light["metadata"] = {k: m[k] for k in _ESSENCE_METADATA if k in m}
        return super().build(body=kopf.Body(cast(kopf.RawBody, light)))


# --------------------------------------------------------------------------- lifecycle


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings, CONFIG)
    tune_gc()
    if _state.runtime is not None:
        await _state.runtime.close()
    rt = Runtime(CONFIG)
    if _state.endpoint is not None:
        rt.client = KubeClient(_state.endpoint, relogin=_relogin(settings))
    _state.runtime = rt
    rt.spawn(resync_forever(rt, RESYNC_SECONDS))
    if CONFIG.metrics_port and _state.metrics_port != CONFIG.metrics_port:
        try:
            metrics.serve(CONFIG.metrics_port, CONFIG.metrics_address)
            _state.metrics_port = CONFIG.metrics_port
        except OSError as e:  # reconciling matters more than metrics: say so loudly, go on
            log.error("cannot serve metrics on %s:%s: %s", CONFIG.metrics_address, CONFIG.metrics_port, e)
    log.info(
        "branchmerge operator started: %s, peering %s, metrics %s",
        "all namespaces" if CONFIG.clusterwide else f"namespaces {', '.join(CONFIG.namespaces)}",
        CONFIG.peering or "off (standalone)",
        f":{CONFIG.metrics_port}/metrics" if CONFIG.metrics_port else "off",
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if _state.runtime is not None:
        await _state.runtime.close()
        _state.runtime = None


def _login_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else a kubeconfig; kubeconfigs that need the official
    client's plugins (exec, auth-provider) go through it."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None or (info.token is None and info.certificate_path is None and info.certificate_data is None):
        with contextlib.suppress(ImportError):
            info = kopf.login_via_client(settings=settings, logger=log) or info
    return info


def _relogin(settings: kopf.OperatorSettings) -> Any:
    def again() -> Endpoint | None:
        info = _login_info(settings)
        return None if info is None else Endpoint.from_connection_info(info)

    return again


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """kopf's watches and our writes use the same credentials."""
    info = _login_info(settings)
    if info is None:
        return None
    _state.endpoint = Endpoint.from_connection_info(info)
    rt = _state.runtime
    if rt is not None:
        if rt.client is None:
            rt.client = KubeClient(_state.endpoint, relogin=_relogin(settings))
        else:
            rt.client.endpoint = _state.endpoint
    return info


@kopf.on.probe(id="reconciles_pending")
async def probe(**_: Any) -> int:
    """Liveness detail: how many objects wait for a reconcile (0 when idle)."""
    rt = _state.runtime
    return 0 if rt is None else rt.distillations.pending + rt.branchjobs.pending


# --------------------------------------------------------------------------- indexes


@kopf.index(*DISTILLATIONS)
async def bm_distillations(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(str(namespace), name): slim(body)}


@kopf.index(*BRANCHJOBS)
async def bm_branchjobs(namespace: str | None, name: str, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    obj = slim(body)
    ns = str(namespace)
    out: dict[Any, Any] = {("name", ns, name): obj}
    if dist := labels.get(LABEL_DISTILLATION):
        out[("dist", ns, dist)] = obj
    return out


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def bm_jobs(namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    dist = labels.get(LABEL_DISTILLATION)
    return {(str(namespace), dist): slim(body)} if dist else {}


@kopf.index("pods", labels=MANAGED)
async def bm_pods(namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    owner = pod_owner_key(labels)
    return {(str(namespace), *owner): slim_pod(body)} if owner else {}


# --------------------------------------------------------------------------- Distillation


@kopf.on.event(*DISTILLATIONS)
async def distillation_event(namespace: str | None, name: str, type: str, body: kopf.Body, **kwargs: Any) -> None:
    """Level-based, like BranchJobs: a Distillation listed at startup (resume), created, edited
    or deleted is reconciled; the echo of our own status write is not (nothing new in it).

    Driven by events alone — no kopf change handlers — so kopf writes no
    `last-handled-configuration` annotation (one API write and one watch event per object and
    generation fewer) and does no per-handler progress bookkeeping. Failures are retried by
    the reconciler with backoff; deletions drop our bookkeeping (children go with the garbage
    collector).
    """
    rt = _rt(kwargs)
    ns = str(namespace)
    if type == "DELETED" or not rt.own_write("Distillation", ns, name, body):
        rt.distillations.trigger((ns, name))


async def resync_forever(rt: Runtime, interval: float) -> None:
    """The safety-net timer: every ``interval`` seconds, reconcile every Distillation and
    BranchJob known to the indexes, spread over the interval, even if an event was missed.

    One operator-wide loop instead of `@kopf.timer`: a kopf timer makes kopf put a finalizer
    on every object — an extra API write (and a watch round trip) before the first reconcile,
    another at deletion, and deletions that hang while the operator is down.
    """
    while True:
        await asyncio.sleep(interval)
        keys = [("d", k) for k in rt.known(IDX_DISTILLATIONS)] + [("b", k) for k in rt.known_branchjobs()]
        for i, (kind, key) in enumerate(keys):
            reconciler = rt.distillations if kind == "d" else rt.branchjobs
            reconciler.trigger(key, debounce=interval * i / max(len(keys), 1))


# --------------------------------------------------------------------------- BranchJob


@kopf.on.event(*BRANCHJOBS)
async def branchjob_event(namespace: str | None, name: str, labels: kopf.Labels, type: str, body: kopf.Body,
                          **kwargs: Any) -> None:  # fmt: skip
    """Level-based: a BranchJob listed at startup, created, edited or deleted is reconciled;
    its Distillation re-plans on every change (its branch summary comes from here).

    BranchJobs are driven by events alone — no change handlers, no kopf timer — so kopf keeps
    no finalizer or bookkeeping annotation on them: three API writes fewer per BranchJob, and
    deleting one never waits for the operator. Their safety net is the requeue each reconcile
    schedules while work is in flight, plus their Distillation's timer.
    """
    rt = _rt(kwargs)
    ns = str(namespace)
    if not rt.own_write("BranchJob", ns, name, body):
        rt.branchjobs.trigger((ns, name))
    if dist := labels.get(LABEL_DISTILLATION):
        rt.distillations.trigger((ns, dist), DEBOUNCE_PARENT)


# --------------------------------------------------------------------------- children


@kopf.on.event("pods", labels=MANAGED)
async def pod_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    """Gang pods wake their BranchJob; merge/eval pods (their termination message is the
    stage result) wake their Distillation."""
    rt = _rt(kwargs)
    owner = pod_owner_key(labels)
    if owner is not None and owner[0] == "BranchJob":
        rt.branchjobs.trigger((str(namespace), owner[1]), DEBOUNCE_GANG)
    elif dist := labels.get(LABEL_DISTILLATION):
        rt.distillations.trigger((str(namespace), dist), DEBOUNCE_PARENT)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    if dist := labels.get(LABEL_DISTILLATION):
        _rt(kwargs).distillations.trigger((str(namespace), dist), DEBOUNCE_PARENT)

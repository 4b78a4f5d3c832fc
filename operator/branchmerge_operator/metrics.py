"""Prometheus metrics of the operator (served on :8080/metrics by `branchmerge operator`).

Why these: users of the peer operators ask for reconcile and failure counts, stage durations
and restart counts (reference/kubernetes.md, trainer#3429). Labels are low-cardinality on
purpose — kinds, stages, outcomes, never object names — so a cluster with thousands of
Distillations does not explode the scrape.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "branchmerge_reconciles_total",
    "Reconciles run, by resource kind and outcome (ok, error).",
    ["kind", "outcome"],
)
RECONCILE_ERRORS = Counter(
    "branchmerge_reconcile_errors_total",
    "Reconciles that failed and were retried, by kind and error class.",
    ["kind", "error"],
)
RECONCILE_SECONDS = Histogram(
    "branchmerge_reconcile_duration_seconds",
    "Time spent in one reconcile (observe, plan, apply).",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SECONDS = Histogram(
    "branchmerge_stage_duration_seconds",
    "Wall time of finished stages (branch training, merge, eval), by stage and outcome.",
    ["stage", "outcome"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
)
GANG_RESTARTS = Counter(
    "branchmerge_gang_restarts_total",
    "Whole-gang restarts of BranchJobs, by cause (failure counts against backoffLimit, disruption does not).",
    ["cause"],
)
ACTIVE_STAGES = Gauge(
    "branchmerge_active_stages",
    "Stages currently running or waiting to start (branch, merge, eval).",
    ["stage"],
)
PHASES = Gauge(
    "branchmerge_resources",
    "Distillations and BranchJobs known to this operator, by kind and phase.",
    ["kind", "phase"],
)
API_REQUESTS = Counter(
    "branchmerge_api_requests_total",
    "Kubernetes API requests made by the reconcilers, by verb, resource and HTTP status.",
    ["verb", "resource", "code"],
)
API_SECONDS = Histogram(
    "branchmerge_api_request_duration_seconds",
    "Latency of the reconcilers' Kubernetes API requests, by verb.",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EVENTS = Counter(
    "branchmerge_events_total",
    "Kubernetes Events emitted, by type and reason.",
    ["type", "reason"],
)

for _stage in ("branch", "merge", "eval"):
    ACTIVE_STAGES.labels(_stage).set(0)


def serve(port: int, address: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Expose /metrics in a background thread (prometheus-client's own HTTP server)."""
    start_http_server(port, addr=address, registry=registry)


def api_writes() -> float:
    """Total writes (POST/PUT/PATCH/DELETE) made so far; the benchmark reads it."""
    total = 0.0
    for metric in API_REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("verb") in ("POST", "PUT", "PATCH", "DELETE"):
                total += sample.value
    return total

"""The reconcile machinery without a cluster: coalescing, read-your-writes, idempotent apply.

A fake API client records every write; fake indexes stand in for kopf's. The planners are
the real ones, so these tests pin what the operator *does* with a plan.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from branchmerge_operator import observe
from branchmerge_operator.kube import ApiError, _resource_label
from branchmerge_operator.observe import Overlay, ProgressCache, as_applied, last_progress, redact
from branchmerge_operator.reconcile import (
    IDX_BRANCHJOBS,
    IDX_DISTILLATIONS,
    IDX_JOBS,
    IDX_PODS,
    OperatorConfig,
    Reconciler,
    Runtime,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- fakes


class FakeClient:
    """Records writes; objects get uids and increasing resourceVersions like a server."""

    def __init__(self) -> None:
        self.rv = 100
        self.writes: list[tuple[str, str, str]] = []
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.logs: dict[str, str] = {}

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.writes.append(("create", kind, name))
        if (kind, namespace, name) in self.objects:
            raise ApiError(409, "AlreadyExists", f"{kind} {name} exists")
        obj = copy.deepcopy(body)
        obj["metadata"].update(namespace=namespace, uid=f"uid-{kind}-{name}-{self.rv}")
        self.objects[(kind, namespace, name)] = self._stamp(obj)
        return copy.deepcopy(obj)

    async def delete(self, kind: str, namespace: str, name: str, *, propagation: str = "Background",
                     uid: str | None = None) -> bool:  # fmt: skip
        self.writes.append(("delete", kind, name))
        obj = self.objects.get((kind, namespace, name))
        if obj is None or (uid is not None and obj["metadata"]["uid"] != uid):
            return False
        del self.objects[(kind, namespace, name)]
        return True

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], *,
                          subresource: str | None = None) -> dict[str, Any]:  # fmt: skip
        self.writes.append(("patch" + (f"/{subresource}" if subresource else ""), kind, name))
        obj = self.objects[(kind, namespace, name)]
        merged = observe.merge_patch_into(obj, patch)
        self.objects[(kind, namespace, name)] = self._stamp(merged)
        return copy.deepcopy(merged)

    async def pod_log(self, namespace: str, name: str, *, container: str, **_: Any) -> str:
        if name not in self.logs:
            raise ApiError(500, "InternalError", "no kubelet")
        return self.logs[name]

    async def close(self) -> None:
        pass


class FakeIndex:
    def __init__(self) -> None:
        self.data: dict[Any, list[dict[str, Any]]] = defaultdict(list)

    def get(self, key: Any, default: Any = None) -> Any:
        return self.data.get(key, default)


def make_runtime(client: FakeClient, now: list[datetime]) -> tuple[Runtime, dict[str, FakeIndex]]:
    rt = Runtime(OperatorConfig(metrics_port=None, progress_interval=5, post_events=False), client,  # type: ignore[arg-type]
                 clock=lambda: now[0])  # fmt: skip
    idx = {n: FakeIndex() for n in (IDX_DISTILLATIONS, IDX_BRANCHJOBS, IDX_JOBS, IDX_PODS)}
    rt.bind(idx)
    return rt, idx


def sync_indexes(client: FakeClient, idx: dict[str, FakeIndex]) -> None:
    """What kopf's watches would deliver: everything the fake server holds."""
    for i in idx.values():
        i.data.clear()
    for (kind, ns, name), obj in client.objects.items():
        labels = obj["metadata"].get("labels") or {}
        if kind == "Distillation":
            idx[IDX_DISTILLATIONS].data[(ns, name)].append(copy.deepcopy(obj))
        elif kind == "BranchJob":
            idx[IDX_BRANCHJOBS].data[("name", ns, name)].append(copy.deepcopy(obj))
            if d := labels.get("branchmerge.io/distillation"):
                idx[IDX_BRANCHJOBS].data[("dist", ns, d)].append(copy.deepcopy(obj))
        elif kind == "Job":
            idx[IDX_JOBS].data[(ns, labels["branchmerge.io/distillation"])].append(copy.deepcopy(obj))
        elif kind == "Pod" and (owner := observe.pod_owner_key(labels)):
            idx[IDX_PODS].data[(ns, *owner)].append(observe.slim_pod(obj))


def distillation_body() -> dict[str, Any]:
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": "tiny", "namespace": "ns", "uid": "uid-dist", "generation": 1, "resourceVersion": "1",
                     "labels": {"app.kubernetes.io/instance": "argo-app"}},
        "spec": {
            "student": {"uri": "s3://b/student"},
            "output": {"uri": "s3://b/out", "credentialsSecret": "s3"},
            "branches": [
                {"name": "math", "datasets": [{"uri": "s3://b/m.jsonl"}], "training": {"globalBatchSize": 2},
                 "resources": {"nodes": 2, "gpusPerNode": 0}},
                {"name": "code", "datasets": [{"uri": "s3://b/c.jsonl"}], "training": {"globalBatchSize": 1},
                 "resources": {"gpusPerNode": 0}},
            ],
        },
    }


def writes_of(client: FakeClient, verb: str, kind: str) -> list[str]:
    return [n for v, k, n in client.writes if v == verb and k == kind]


# --------------------------------------------------------------------------- Distillation


def test_new_distillation_creates_owned_branchjobs_and_writes_status_once() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        client.objects[("Distillation", "ns", "tiny")] = distillation_body()
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        assert sorted(writes_of(client, "create", "BranchJob")) == ["tiny-code", "tiny-math"]
        assert writes_of(client, "patch/status", "Distillation") == ["tiny"]
        bj = client.objects[("BranchJob", "ns", "tiny-math")]
        [ref] = bj["metadata"]["ownerReferences"]
        assert ref["kind"] == "Distillation" and ref["uid"] == "uid-dist" and ref["controller"] is True
        # The parent's labels (here Argo CD's tracking label) are not copied onto children.
        assert "app.kubernetes.io/instance" not in bj["metadata"]["labels"]
        assert bj["metadata"]["labels"]["branchmerge.io/distillation"] == "tiny"
        status = client.objects[("Distillation", "ns", "tiny")]["status"]
        assert status["phase"] == "Pending" and status["observedGeneration"] == 1
        assert {c["type"] for c in status["conditions"]} >= {"Ready", "Reconciling", "Stalled"}

        # The children's ADDED events are not mistaken for echoes of the children's own writes.
        bj_body = client.objects[("BranchJob", "ns", "tiny-math")]
        assert not rt.own_write("BranchJob", "ns", "tiny-math", bj_body)
        dist_body = client.objects[("Distillation", "ns", "tiny")]
        assert rt.own_write("Distillation", "ns", "tiny", dist_body)  # our status patch echoed
        # Before the watch delivers anything, a second pass sees its own writes: no writes.
        client.writes.clear()
        await rt.reconcile_distillation(("ns", "tiny"))
        assert client.writes == []
        # Once the watch caught up, the same: level-based and idempotent.
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        assert client.writes == []

    asyncio.run(go())


def test_children_created_by_an_earlier_operator_are_not_duplicated() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        client.objects[("Distillation", "ns", "tiny")] = distillation_body()
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        # A fresh operator (empty overlay) whose indexes have not seen the BranchJobs yet:
        # creates hit AlreadyExists, which is success.
        rt2, idx2 = make_runtime(client, now)
        sync_indexes(client, idx2)
        for key in list(idx2[IDX_BRANCHJOBS].data):
            del idx2[IDX_BRANCHJOBS].data[key]
        client.writes.clear()
        await rt2.reconcile_distillation(("ns", "tiny"))
        assert sorted(writes_of(client, "create", "BranchJob")) == ["tiny-code", "tiny-math"]
        assert len([o for o in client.objects if o[0] == "BranchJob"]) == 2

    asyncio.run(go())


def test_a_pruned_unknown_field_stalls_with_the_fix() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        body = distillation_body()
        applied = copy.deepcopy(body)
        applied["spec"]["runPolicy"] = {"backofLimit": 5}  # a typo the API server pruned
        body["metadata"]["annotations"] = {observe.LAST_APPLIED: json.dumps(applied)}
        client.objects[("Distillation", "ns", "tiny")] = body
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        assert writes_of(client, "create", "BranchJob") == []
        status = client.objects[("Distillation", "ns", "tiny")]["status"]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
        assert "spec.runPolicy.backofLimit" in stalled["message"] and "backoffLimit" in stalled["message"]

    asyncio.run(go())


# --------------------------------------------------------------------------- BranchJob


def branchjob_from_plan(client: FakeClient) -> dict[str, Any]:
    return client.objects[("BranchJob", "ns", "tiny-math")]


def pod_status(phase: str, **term: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {}}]}
    if phase == "Running":
        status["containerStatuses"][0]["state"] = {"running": {"startedAt": "2026-01-01T12:00:00Z"}}
    if term:
        status["containerStatuses"][0]["state"] = {"terminated": term}
    return status


def test_gang_created_whole_then_restarted_whole_on_failure() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        client.objects[("Distillation", "ns", "tiny")] = distillation_body()
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        sync_indexes(client, idx)
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-math"))
        assert writes_of(client, "create", "Service") == ["tiny-math"]
        assert sorted(writes_of(client, "create", "Pod")) == ["tiny-math-0", "tiny-math-1"]
        pod0 = client.objects[("Pod", "ns", "tiny-math-0")]
        assert pod0["metadata"]["ownerReferences"][0]["kind"] == "BranchJob"

        # Both running, rank 0 reports progress in its log.
        for name in ("tiny-math-0", "tiny-math-1"):
            client.objects[("Pod", "ns", name)]["status"] = pod_status("Running")
        client.logs["tiny-math-0"] = 'noise\nBRANCHMERGE_PROGRESS {"step":3,"totalSteps":10,"loss":1.5}\nmore noise\n'
        sync_indexes(client, idx)
        client.writes.clear()
        delay = await rt.reconcile_branchjob(("ns", "tiny-math"))
        st = branchjob_from_plan(client)["status"]
        assert st["phase"] == "Running" and st["progress"]["step"] == 3 and st["progress"]["totalSteps"] == 10
        assert delay is not None and delay <= 5  # the progress poll
        assert client.writes == [("patch/status", "BranchJob", "tiny-math")]

        # Rank 1 fails: the whole gang goes (both pods, each by its uid), restarts = 1.
        client.objects[("Pod", "ns", "tiny-math-1")]["status"] = pod_status(
            "Failed", exitCode=1, reason="Error",
            message=json.dumps({"apiVersion": "branchmerge.io/v1alpha1", "kind": "SFT", "status": "Failed",
                                "fingerprint": "x", "error": {"reason": "InternalError", "message": "boom"}}))  # fmt: skip
        sync_indexes(client, idx)
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-math"))
        assert sorted(writes_of(client, "delete", "Pod")) == ["tiny-math-0", "tiny-math-1"]
        st = branchjob_from_plan(client)["status"]
        assert st["restarts"] == 1 and st["attempt"] == 1 and st["phase"] == "Restarting"
        assert "boom" in st["message"]
        # A pass before the deletions are watched must not count the failure again.
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-math"))
        assert branchjob_from_plan(client)["status"]["restarts"] == 1
        assert not writes_of(client, "create", "Pod")
        # Once gone, attempt 1 is created as a whole.
        sync_indexes(client, idx)
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-math"))
        assert sorted(writes_of(client, "create", "Pod")) == ["tiny-math-0", "tiny-math-1"]
        assert client.objects[("Pod", "ns", "tiny-math-0")]["metadata"]["labels"]["branchmerge.io/attempt"] == "1"

    asyncio.run(go())


def test_narrative_status_changes_are_rate_limited_decisions_are_not() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        rt.progress.interval = 0  # read rank 0's log on every pass
        client.objects[("Distillation", "ns", "tiny")] = distillation_body()
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        sync_indexes(client, idx)
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-code"))
        # Gang created; its status is written once, already describing the pods just created
        # (not "creating", then "0/1 running" a moment later).
        assert writes_of(client, "patch/status", "BranchJob") == ["tiny-code"]
        st = client.objects[("BranchJob", "ns", "tiny-code")]["status"]
        assert (st["phase"], st["reason"], st["message"]) == ("Pending", "Starting", "0/1 pod(s) running")
        client.objects[("Pod", "ns", "tiny-code-0")]["status"] = pod_status("Pending")
        sync_indexes(client, idx)
        client.writes.clear()
        await rt.reconcile_branchjob(("ns", "tiny-code"))  # the watch caught up: nothing new
        assert client.writes == []
        client.objects[("Pod", "ns", "tiny-code-0")]["status"] = pod_status("Running")
        client.logs["tiny-code-0"] = 'BRANCHMERGE_PROGRESS {"step":1,"totalSteps":10,"loss":2.0}\n'
        sync_indexes(client, idx)
        await rt.reconcile_branchjob(("ns", "tiny-code"))  # Running: a new phase, written at once
        assert client.writes == [("patch/status", "BranchJob", "tiny-code")]
        assert client.objects[("BranchJob", "ns", "tiny-code")]["status"]["phase"] == "Running"
        client.logs["tiny-code-0"] = 'BRANCHMERGE_PROGRESS {"step":2,"totalSteps":10,"loss":1.5}\n'
        client.writes.clear()
        delay = await rt.reconcile_branchjob(("ns", "tiny-code"))  # progress: narrative only
        assert client.writes == [] and delay is not None and delay <= 2.0
        assert client.objects[("BranchJob", "ns", "tiny-code")]["status"]["progress"]["step"] == 1

    asyncio.run(go())


def test_status_writes_share_a_few_slots() -> None:
    """Status patches queue for STATUS_WRITE_SLOTS slots; every one is still written."""
    from branchmerge_operator.reconcile import STATUS_WRITE_SLOTS

    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, _ = make_runtime(client, now)
        inflight, peak = [0], [0]
        real = client.merge_patch

        async def slow_patch(*args: Any, **kwargs: Any) -> dict[str, Any]:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
            await asyncio.sleep(0.01)
            inflight[0] -= 1
            return await real(*args, **kwargs)

        client.merge_patch = slow_patch  # type: ignore[method-assign]
        bodies = []
        for i in range(3 * STATUS_WRITE_SLOTS):
            body = {**distillation_body(), "metadata": {**distillation_body()["metadata"], "name": f"d{i}"}}
            client.objects[("Distillation", "ns", f"d{i}")] = copy.deepcopy(body)
            bodies.append(body)
        await asyncio.gather(*(rt._write_status("Distillation", b, {"phase": "Pending"}) for b in bodies))
        assert peak[0] == STATUS_WRITE_SLOTS
        assert all(client.objects[("Distillation", "ns", f"d{i}")]["status"]["phase"] == "Pending"
                   for i in range(len(bodies)))  # fmt: skip

    asyncio.run(go())


def test_unreadable_logs_keep_reconciling() -> None:
    async def go() -> None:
        client, now = FakeClient(), [NOW]
        rt, idx = make_runtime(client, now)
        client.objects[("Distillation", "ns", "tiny")] = distillation_body()
        sync_indexes(client, idx)
        await rt.reconcile_distillation(("ns", "tiny"))
        sync_indexes(client, idx)
        await rt.reconcile_branchjob(("ns", "tiny-code"))
        client.objects[("Pod", "ns", "tiny-code-0")]["status"] = pod_status("Running")
        sync_indexes(client, idx)
        await rt.reconcile_branchjob(("ns", "tiny-code"))  # the log read fails: no progress, no error
        st = client.objects[("BranchJob", "ns", "tiny-code")]["status"]
        assert st["phase"] == "Running" and "progress" not in st

    asyncio.run(go())


# --------------------------------------------------------------------------- coalescing


def test_reconciler_coalesces_a_burst_into_one_more_pass_and_backs_off_on_errors() -> None:
    async def go() -> None:
        calls: list[int] = []
        gate = asyncio.Event()
        fail = [False]

        async def fn(key: tuple[str, str]) -> float | None:
            calls.append(1)
            if len(calls) == 1:
                await gate.wait()
            if fail[0]:
                raise RuntimeError("API down")
            return None

        r = Reconciler("Test", fn)
        first = asyncio.create_task(r.run(("ns", "a")))
        await asyncio.sleep(0)
        for _ in range(10):
            r.trigger(("ns", "a"))
        gate.set()
        assert await first is None
        assert len(calls) == 2  # the running pass + one coalesced pass for ten triggers
        fail[0] = True
        error = await r.run(("ns", "a"))
        assert isinstance(error, RuntimeError)
        assert r._states[("ns", "a")].timer is not None  # a backoff requeue is scheduled
        await r.close()

    asyncio.run(go())


def test_debounced_triggers_fold_into_one_pass() -> None:
    async def go() -> None:
        calls: list[float] = []

        async def fn(key: tuple[str, str]) -> float | None:
            calls.append(asyncio.get_running_loop().time())
            return None

        r = Reconciler("Test", fn)
        start = asyncio.get_running_loop().time()
        for _ in range(20):
            r.trigger(("ns", "a"), debounce=0.2)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.4)
        assert len(calls) == 1 and calls[0] - start >= 0.2
        r.trigger(("ns", "a"), debounce=5.0)
        r.trigger(("ns", "a"))  # an immediate trigger does not wait for the debounced one
        await asyncio.sleep(0.05)
        assert len(calls) == 2
        await r.close()

    asyncio.run(go())


# --------------------------------------------------------------------------- observe helpers


def test_overlay_children_by_controller() -> None:
    ov = Overlay(ttl=10, clock=lambda: 0.0)

    def pod(name: str, owner: str, controller: bool = True) -> dict[str, Any]:
        ref = {"apiVersion": "branchmerge.io/v1alpha1", "kind": "BranchJob", "name": owner, "uid": owner,
               "controller": controller}  # fmt: skip
        return {"metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "5",
                             "ownerReferences": [ref]}}  # fmt: skip

    mine, other, not_controller = pod("a-0", "a"), pod("b-0", "b"), pod("c-0", "a", controller=False)
    for p in (mine, other, not_controller):
        ov.wrote("Pod", p)
    assert ov.many("Pod", "ns", [], ("BranchJob", "a")) == [mine]
    assert ov.many("Pod", "ns", [], ("Job", "a")) == []
    assert ov.many("Pod", "ns", [], lambda o: observe.owned_by(o, "BranchJob", "a")) == [mine]


def test_overlay_read_your_writes() -> None:
    t = [0.0]
    ov = Overlay(ttl=10, clock=lambda: t[0])
    created = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "5"}}
    ov.wrote("Pod", created)
    assert ov.many("Pod", "ns", [], lambda o: True) == [created]  # not watched yet: ours
    old = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "4"}}
    assert ov.one("Pod", "ns", "p", old) == created  # the watch is behind
    new = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "6"}}
    assert ov.one("Pod", "ns", "p", new) == new and len(ov) == 0  # caught up: entry dropped
    ov.deleted("Pod", "ns", "p", "u1")
    shown = ov.one("Pod", "ns", "p", new)
    assert shown is not None and shown["metadata"]["deletionTimestamp"]
    replaced = {"metadata": {"name": "p", "namespace": "ns", "uid": "u2", "resourceVersion": "9"}}
    assert ov.one("Pod", "ns", "p", replaced) == replaced  # a new object under the old name
    ov.wrote("Pod", created)
    t[0] = 11
    ov.expire()
    assert len(ov) == 0


def test_progress_lines_and_cache() -> None:
    log = (
        'BRANCHMERGE_PROGRESS {"step":1,"totalSteps":4}\n'
        'x BRANCHMERGE_PROGRESS {"step":2,"totalSteps":4,"loss":0.5,"etaSeconds":3}\n'
        "BRANCHMERGE_PROGRESS {broken\n"
    )
    p = last_progress(log)
    assert p is not None and p.step == 2 and p.loss == 0.5
    assert last_progress("nothing here") is None
    t = [0.0]
    cache = ProgressCache(interval=30, clock=lambda: t[0])
    assert cache.due(("ns", "bj"), "u1")
    cache.store(("ns", "bj"), "u1", p)
    assert not cache.due(("ns", "bj"), "u1") and cache.due(("ns", "bj"), "u2")
    cache.store(("ns", "bj"), "u1", None)  # an unreadable log keeps the numbers
    assert cache.get(("ns", "bj"), "u1") == p and cache.get(("ns", "bj"), "u2") is None
    t[0] = 31
    assert cache.due(("ns", "bj"), "u1")


def test_redact_masks_credentials() -> None:
    text = "boto: key AKIAABCDEFGHIJKLMNOP rejected; aws_secret_access_key=abc123/xyz token: t0k3n"
    out = redact(text)
    assert out is not None
    assert "AKIAABCDEFGHIJKLMNOP" not in out and "abc123" not in out and "t0k3n" not in out
    assert redact("x" * 5000, 100) is not None and len(redact("x" * 5000, 100) or "") == 100


def test_as_applied_only_when_the_server_pruned_something() -> None:
    body = distillation_body()
    assert as_applied(body) is body
    body["metadata"]["annotations"] = {observe.LAST_APPLIED: json.dumps({**distillation_body(), "status": None})}
    assert as_applied(body) is body  # a valid applied spec: the stored object is used
    leaked = distillation_body()
    leaked["spec"]["output"]["secretAccessKey"] = "hunter2"
    body["metadata"]["annotations"] = {observe.LAST_APPLIED: json.dumps(leaked)}
    assert as_applied(body)["spec"]["output"]["secretAccessKey"] == "hunter2"


def test_job_result_waits_briefly_for_the_pod_message() -> None:
    client, now = FakeClient(), [NOW]
    rt, idx = make_runtime(client, now)
    body = distillation_body()
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "tiny-merge-abc", "namespace": "ns", "uid": "j1",
                     "labels": {"branchmerge.io/distillation": "tiny", "branchmerge.io/stage": "merge"},
                     "ownerReferences": [{"kind": "Distillation", "name": "tiny", "controller": True}]},
        "status": {"conditions": [{"type": "Complete", "status": "True"}],
                   "completionTime": (NOW - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }  # fmt: skip
    idx[IDX_JOBS].data[("ns", "tiny")].append(job)
    observed, _, wait = rt.observe_distillation(("ns", "tiny"), body, NOW)
    assert observed.jobs[0].phase == "Active" and wait == 2.0
    now[0] = NOW + timedelta(seconds=60)
    observed, _, wait = rt.observe_distillation(("ns", "tiny"), body, now[0])
    assert observed.jobs[0].phase == "Succeeded" and wait is None


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/api/v1/namespaces/ns/pods", "pods"),
        ("/api/v1/namespaces/ns/pods/p/log", "pods/log"),
        ("/apis/branchmerge.io/v1alpha1/namespaces/ns/distillations/d/status", "distillations/status"),
        ("/apis/batch/v1/namespaces/ns/jobs/j", "jobs"),
    ],
)
def test_api_request_metric_labels(path: str, label: str) -> None:
    assert _resource_label(path) == label

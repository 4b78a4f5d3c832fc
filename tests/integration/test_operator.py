"""Operator policies against the real control plane, with a fake stage binary.

These scenarios need pods that start, run, fail, get evicted or never start — not training —
so their pods run on a dedicated process-kubelet node whose `branchmerge-train` is a small
script honouring the stage contract (tests/operator_kit.py), steered per pod by the test.
The operator runs in-process (kopf.testing.KopfRunner) so it can read rank 0's log from the
kubelet's files. The real stages run in tests/e2e/test_operator_e2e.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster import Cluster, ProcessKubelet
from tests.cluster.fixtures import start_node
from tests.operator_kit import (
    Api,
    FakeStages,
    apply,
    describe,
    in_process_operator,
    install_crds,
    wait_events,
    wait_for,
)

pytestmark = [pytest.mark.cluster]

POOL = {"branchmerge.io/test-pool": "fake"}
TAINT = {"key": "branchmerge.io/fake-stages", "value": "true", "effect": "NoSchedule"}
MALFORMED = sorted((Path(__file__).resolve().parents[1] / "unit" / "malformed").glob("*.yaml"))


@pytest.fixture(scope="module")
def fake(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeStages, ProcessKubelet]]:
    """A tainted node (8 GPUs) whose pods run the fake stage."""
    stages = FakeStages(tmp_path_factory.mktemp("fake-stages"))
    kubelet = start_node(cluster, "fake-node", gpus=8, labels=POOL, extra_env=stages.env())
    with cluster.api_client() as api:
        client.CoreV1Api(api).patch_node("fake-node", {"spec": {"taints": [TAINT]}})
    try:
        yield stages, kubelet
    finally:
        kubelet.stop()
        with cluster.api_client() as api:
            client.CoreV1Api(api).delete_node("fake-node")


@pytest.fixture(scope="module")
def operator(cluster: Cluster, fake: Any) -> Iterator[Any]:
    install_crds(cluster)
    with in_process_operator(cluster, progress_interval=1.0) as runner:
        yield runner


def placement(nodes: int = 1, gpus: int = 0) -> dict[str, Any]:
    return {"nodes": nodes, "gpusPerNode": gpus, "cpu": "10m", "memory": "64Mi", "nodeSelector": dict(POOL),
            "tolerations": [{"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]}  # fmt: skip


def branchjob(name: str, *, nodes: int = 1, gpus: int = 0, secret: str | None = None, **policy: Any) -> dict[str, Any]:
    output: dict[str, Any] = {"uri": "s3://fake/out"}
    if secret:
        output["credentialsSecret"] = secret
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "BranchJob",
        "metadata": {"name": name},
        "spec": {
            "student": {"uri": "s3://fake/student"},
            "datasets": [{"uri": "s3://fake/data.jsonl"}],
            "training": {"globalBatchSize": max(1, nodes * max(gpus, 1)), "microBatchSize": 1},
            "resources": placement(nodes, gpus),
            "output": output,
            "runPolicy": {"backoffLimit": 1, "startupDeadlineSeconds": 120, **policy},
        },
    }


def status(api: Api, name: str, ns: str, plural: str = "branchjobs") -> dict[str, Any]:
    return (api.get(plural, ns, name) or {}).get("status") or {}


def running(api: Api, ns: str, names: list[str]) -> bool:
    pods = {p.metadata.name: p for p in api.pods(ns)}
    return all(n in pods and pods[n].status.phase == "Running" and not pods[n].metadata.deletion_timestamp for n in names)


def test_progress_from_rank0_log_shows_in_kubectl_get(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, _ = fake
    api, ns = Api(k8s_api), namespace
    stages.set("prog-0", "slow 0.7")
    apply(cluster, ns, branchjob("prog"))
    debug = lambda: describe(api, ns)  # noqa: E731
    wait_for("progress in status", lambda: (status(api, "prog", ns).get("progress") or {}).get("step", 0) >= 2,
             60, debug=debug)  # fmt: skip
    table = cluster.kubectl("get", "bj", "prog", "-n", ns)
    assert re.search(r"prog\s+False\s+Running\s+\d+\s+10\s", table), table
    wait_for("Succeeded", lambda: status(api, "prog", ns).get("phase") == "Succeeded", 60, debug=debug)
    st = status(api, "prog", ns)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 10
    assert st["outputUri"].startswith("s3://fake/out/branches/prog/")
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"


def test_eviction_does_not_count_against_backoff_limit(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, kubelet = fake
    api, ns = Api(k8s_api), namespace
    stages.set("all", "hold")
    try:
        apply(cluster, ns, branchjob("evict", nodes=2, backoffLimit=0))
        debug = lambda: describe(api, ns)  # noqa: E731
        wait_for("gang running", lambda: running(api, ns, ["evict-0", "evict-1"]), 60, debug=debug)
        first = {p.metadata.name: p.metadata.uid for p in api.pods(ns)}
        kubelet.evict(ns, "evict-1")
        wait_for("restarted gang running", lambda: running(api, ns, ["evict-0", "evict-1"])
                 and {p.metadata.uid for p in api.pods(ns)}.isdisjoint(first.values()), 60, debug=debug)  # fmt: skip
        st = status(api, "evict", ns)
        assert st["disruptions"] == 1 and st["restarts"] == 0 and st["attempt"] == 1
        assert all(p.metadata.labels["branchmerge.io/attempt"] == "1" for p in api.pods(ns))
    finally:
        stages.clear("all")
    wait_for("Succeeded", lambda: status(api, "evict", ns).get("phase") == "Succeeded", 60, debug=debug)
    wait_events(api, ns, "evict", "Disrupted", "Succeeded")


def test_a_failed_pod_restarts_the_whole_gang_until_the_backoff_limit(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, _ = fake
    api, ns = Api(k8s_api), namespace
    stages.set("flaky-0", "hold")
    stages.set("flaky-1", "fail")
    try:
        apply(cluster, ns, branchjob("flaky", nodes=2, backoffLimit=1))
        debug = lambda: describe(api, ns)  # noqa: E731
        wait_for("first restart", lambda: status(api, "flaky", ns).get("restarts") == 1, 60, debug=debug)
        wait_for("Failed", lambda: status(api, "flaky", ns).get("phase") == "Failed", 60, debug=debug)
    finally:
        stages.clear("flaky-0")
        stages.clear("flaky-1")
    st = status(api, "flaky", ns)
    assert st["reason"] == "BackoffLimitExceeded" and st["restarts"] == 1 and st["disruptions"] == 0
    assert "fake failure on flaky-1" in st["message"] and "rank 1" in st["message"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Stalled"]["status"] == "True"
    # Rank 0 was healthy but never left running alone: no pod still runs.
    wait_for("no running pods", lambda: not [p for p in api.pods(ns) if p.status.phase in ("Pending", "Running")
                                              and not p.metadata.deletion_timestamp], 30, debug=debug)  # fmt: skip
    # Terminal is sticky: nothing is re-created later.
    before = {p.metadata.uid for p in api.pods(ns)}
    operator_events = wait_events(api, ns, "flaky", "Restarting", "BackoffLimitExceeded")
    assert operator_events.count("Restarting") == 1
    time.sleep(2)
    assert {p.metadata.uid for p in api.pods(ns)} <= before


@pytest.mark.parametrize(
    ("case", "reason", "needle"),
    [("gpus", "Unschedulable", "Insufficient nvidia.com/gpu"), ("secret", "CreateContainerConfigError", "not found")],
)
def test_a_gang_that_never_starts_fails_at_the_startup_deadline(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, case: str, reason: str, needle: str
) -> None:
    api, ns = Api(k8s_api), namespace
    if case == "gpus":  # 16 GPUs per pod on nodes with 8
        bj = branchjob("stuck", gpus=16, startupDeadlineSeconds=3)
    else:  # the credentials Secret does not exist
        bj = branchjob("stuck", secret="no-such-secret", startupDeadlineSeconds=3)
    apply(cluster, ns, bj)
    wait_for("Failed", lambda: status(api, "stuck", ns).get("phase") == "Failed", 60, debug=lambda: describe(api, ns))
    st = status(api, "stuck", ns)
    assert st["reason"] == reason, st
    assert needle in st["message"] and "startupDeadlineSeconds=3" in st["message"]
    wait_for("pods removed", lambda: not api.pods(ns), 30)


def test_suspend_stops_pods_and_resume_continues(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, _ = fake
    api, ns = Api(k8s_api), namespace
    stages.set("pause-0", "hold")
    try:
        apply(cluster, ns, branchjob("pause"))
        debug = lambda: describe(api, ns)  # noqa: E731
        wait_for("progress", lambda: (status(api, "pause", ns).get("progress") or {}).get("step"), 60, debug=debug)
        api.patch("branchjobs", ns, "pause", {"spec": {"runPolicy": {"suspend": True}}})
        wait_for("Suspended, pods gone", lambda: status(api, "pause", ns).get("phase") == "Suspended"
                 and not api.pods(ns), 60, debug=debug)  # fmt: skip
        st = status(api, "pause", ns)
        assert st["progress"]["step"] >= 1  # progress kept while suspended
        assert {c["type"]: c["status"] for c in st["conditions"]}["Suspended"] == "True"
    finally:
        stages.clear("pause-0")
    api.patch("branchjobs", ns, "pause", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for("Succeeded", lambda: status(api, "pause", ns).get("phase") == "Succeeded", 60, debug=debug)
    st = status(api, "pause", ns)
    assert st["restarts"] == 0 and st["attempt"] == 1


def distillation(name: str, branches: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": {
            "student": {"uri": "s3://fake/student"},
            "output": {"uri": f"s3://fake/{name}"},
            "branches": [{"name": b, "datasets": [{"uri": f"s3://fake/{b}.jsonl"}],
                          "training": {"globalBatchSize": 1}, "resources": placement()} for b in branches],
            "merge": {"resources": {"nodeSelector": dict(POOL), "tolerations": placement()["tolerations"]}},
            "eval": {"benchmarks": [{"name": "arith", "kind": "math", "uri": "s3://fake/bench.jsonl"}],
                     "resources": {"nodeSelector": dict(POOL), "tolerations": placement()["tolerations"]}},
            "runPolicy": {"backoffLimit": 0},
        },
    }


def test_pipeline_publishes_scores_and_terminal_state_is_sticky(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    api, ns = Api(k8s_api), namespace
    apply(cluster, ns, distillation("pipe", ["math", "code", "science"]))
    debug = lambda: describe(api, ns)  # noqa: E731
    wait_for("Succeeded", lambda: status(api, "pipe", ns, "distillations").get("phase") == "Succeeded", 90, debug=debug)
    st = status(api, "pipe", ns, "distillations")
    assert st["branchesSucceeded"] == "3/3" and st["headline"] == "arith=50.0"
    assert {(s["model"], s["benchmark"], s["samples"]) for s in st["evaluation"]["results"]} == {
        ("merged", "arith", 2), ("student", "arith", 2)}
    assert st["merge"]["phase"] == "Succeeded" and st["mergedModel"].startswith("s3://fake/pipe/merge/")
    types = {c["type"]: c["status"] for c in st["conditions"]}
    assert types["BranchesSucceeded"] == types["Merged"] == types["Evaluated"] == types["Ready"] == "True"
    # A finished Distillation does not re-create a child someone deleted.
    api.delete("branchjobs", ns, "pipe-math")
    wait_for("BranchJob gone", lambda: api.get("branchjobs", ns, "pipe-math") is None, 30)
    time.sleep(2)
    assert api.get("branchjobs", ns, "pipe-math") is None
    assert status(api, "pipe", ns, "distillations") == st


def test_a_failed_branch_fails_the_distillation_and_stops_the_others(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, _ = fake
    api, ns = Api(k8s_api), namespace
    stages.set("doomed-math-0", "invalid")
    stages.set("doomed-code-0", "hold")
    try:
        apply(cluster, ns, distillation("doomed", ["math", "code"]))
        debug = lambda: describe(api, ns)  # noqa: E731
        wait_for("Failed", lambda: status(api, "doomed", ns, "distillations").get("phase") == "Failed", 60, debug=debug)
        st = status(api, "doomed", ns, "distillations")
        failed = {c["type"]: c for c in st["conditions"]}["Failed"]
        assert failed["status"] == "True" and failed["reason"] == "BranchFailed"
        assert "InvalidInput" in failed["message"] and "bad data in doomed-math-0" in failed["message"]
        # InvalidInput is not retried; the healthy branch is stopped instead of burning GPUs.
        assert status(api, "doomed-math", ns)["restarts"] == 0
        wait_for("other branch stopped", lambda: api.get("branchjobs", ns, "doomed-code") is None
                 and not [p for p in api.pods(ns) if p.status.phase == "Running"], 60, debug=debug)  # fmt: skip
    finally:
        stages.clear("doomed-math-0")
        stages.clear("doomed-code-0")


def test_suspending_a_distillation_suspends_its_branches_and_resumes(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any, fake: Any
) -> None:
    stages, _ = fake
    api, ns = Api(k8s_api), namespace
    stages.set("nap-math-0", "hold")
    stages.set("nap-code-0", "hold")
    try:
        apply(cluster, ns, distillation("nap", ["math", "code"]))
        debug = lambda: describe(api, ns)  # noqa: E731
        wait_for("gangs running", lambda: running(api, ns, ["nap-math-0", "nap-code-0"]), 60, debug=debug)
        api.patch("distillations", ns, "nap", {"spec": {"runPolicy": {"suspend": True}}})
        wait_for("Suspended, pods gone", lambda: status(api, "nap", ns, "distillations").get("phase") == "Suspended"
                 and not api.pods(ns) and all(status(api, f"nap-{b}", ns).get("phase") == "Suspended"
                                              for b in ("math", "code")), 60, debug=debug)  # fmt: skip
        conds = {c["type"]: c["status"] for c in status(api, "nap", ns, "distillations")["conditions"]}
        assert conds["Suspended"] == "True" and conds["Ready"] == "False"
    finally:
        stages.clear("nap-math-0")
        stages.clear("nap-code-0")
    api.patch("distillations", ns, "nap", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for("Succeeded", lambda: status(api, "nap", ns, "distillations").get("phase") == "Succeeded", 90, debug=debug)
    assert all(status(api, f"nap-{b}", ns)["restarts"] == 0 for b in ("math", "code"))
    wait_events(api, ns, "nap", "Suspended", "Resumed", "Succeeded")


def _expectations(path: Path) -> list[str]:
    return re.findall(r"^# expect: (.*)$", path.read_text(), re.M)


def test_malformed_manifests_are_rejected_or_stalled(
    cluster: Cluster, k8s_api: Any, namespace: str, operator: Any
) -> None:
    """Each malformed manifest is refused by `kubectl apply` (CRD schema) or, when only the
    operator can tell (cross-field rules), surfaces as Stalled with the field and the fix."""
    api, ns = Api(k8s_api), namespace
    assert len(MALFORMED) >= 20
    rejected: dict[str, str] = {}
    accepted: dict[str, tuple[str, str]] = {}
    for i, path in enumerate(MALFORMED):
        [doc] = list(yaml.safe_load_all(path.read_text()))
        name = f"bad-{i:02d}" if re.fullmatch(r"[a-z0-9-]{1,39}", doc["metadata"]["name"]) else doc["metadata"]["name"]
        doc["metadata"]["name"] = name
        out = cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=False)
        res = cluster.kubectl("get", "-n", ns, f"{doc['kind'].lower()}.branchmerge.io/{name}", "-o", "name",
                              check=False) if doc.get("apiVersion") == "branchmerge.io/v1alpha1" else ""  # fmt: skip
        if res.strip():
            plural = "distillations" if doc["kind"] == "Distillation" else "branchjobs"
            accepted[path.name] = (plural, name)
        else:
            rejected[path.name] = out
    assert rejected and accepted
    for fname, (plural, name) in accepted.items():
        expected = _expectations(MALFORMED[[p.name for p in MALFORMED].index(fname)])
        cond = wait_for(f"{fname} Stalled", lambda p=plural, n=name: (
            c if (c := api.condition(p, ns, n, "Stalled")) and c["status"] == "True" else None), 30)  # fmt: skip
        assert cond["reason"] == "InvalidSpec"
        assert expected[0] in cond["message"], (fname, cond["message"])
        assert api.condition(plural, ns, name, "Ready")["status"] == "False"
    assert not [b for b in api.list("branchjobs", ns) if "branchmerge.io/distillation" in b["metadata"].get("labels", {})]
    assert not api.pods(ns), "an invalid spec created pods"
    # Credentials typed into a spec are pruned by the server with --validate=false: the
    # operator still notices (kubectl's last-applied copy) and stalls instead of running.
    leaked = next(p for p in MALFORMED if "secret-key" in p.name)
    [doc] = list(yaml.safe_load_all(leaked.read_text()))
    doc["metadata"]["name"] = "leaky"
    cluster.kubectl("apply", "--validate=false", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    cond = wait_for("leaky Stalled", lambda: (
        c if (c := api.condition("distillations", ns, "leaky", "Stalled")) and c["status"] == "True" else None), 30)
    assert "credentials are not allowed" in cond["message"]
    print(f"\n{len(rejected)} rejected by kubectl apply, {len(accepted)} Stalled by the operator")

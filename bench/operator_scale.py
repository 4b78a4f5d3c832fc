"""How the operator scales on the test control plane, against a minimal kopf operator (the floor).

Phase A — burst: N Distillations × 3 branches created at once (no node: pods stay Pending, so
only the control plane is measured). Time until every BranchJob, Pod and headless Service
exists; operator RSS and CPU seconds. The same burst against a minimal kopf operator that,
per Distillation, creates the same 9 children (3 BranchJobs, 3 Pods, 3 Services) and patches
the status once — the floor for this control plane and kopf.

Phase B — lifecycle: M Distillations run to Succeeded on a process-kubelet node whose
`branchmerge-train` is the tests' fake stage (no training), then are deleted. API writes per
Distillation lifecycle = the operator client's own writes (creates, deletes, status and child
patches, counted by `branchmerge_api_requests_total`) + kopf's writes on our resources
(finalizers and its bookkeeping annotation: PATCHes of distillations/branchjobs counted by the
API server, minus ours) + Events posted.

    .venv/bin/python bench/operator_scale.py [--distillations 100] [--lifecycle 10]

Our operator runs the burst twice: as shipped, and with `--no-events` (the floor posts none).
Ends with one `RESULT <name> <value> goal <op> <target>` line per goal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.cluster.fixtures import start_node  # noqa: E402
from tests.cluster.procs import free_port  # noqa: E402
from tests.operator_kit import FakeStages  # noqa: E402

VENV_BIN = Path(sys.executable).parent
BRANCHES = ("math", "code", "science")

# kopf ships no API client of its own for handlers; the floor uses the same aiohttp client
# as the operator (branchmerge_operator.kube) so the comparison is about the reconcile, not
# about HTTP libraries.
MINIMAL = textwrap.dedent(
    '''
    """The floor: per Distillation, create 3 BranchJobs, 3 Pods, 3 Services; patch status once."""
    import asyncio
    from typing import Any

    import kopf

    from branchmerge_operator.kube import Endpoint, KubeClient

    CLIENT: dict[str, KubeClient] = {}

    @kopf.on.startup()
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        settings.peering.standalone = True

    @kopf.on.login()
    def login(settings: kopf.OperatorSettings, **_: Any) -> Any:
        info = kopf.login_with_kubeconfig(settings=settings)
        CLIENT["c"] = KubeClient(Endpoint.from_connection_info(info))
        return info

    @kopf.on.create("branchmerge.io", "v1alpha1", "distillations")
    async def create(name: str, namespace: str, body: Any, patch: Any, **_: Any) -> None:
        api = CLIENT["c"]
        spec = body["spec"]
        children = []
        for branch in spec["branches"]:
            n = f"{name}-{branch['name']}"
            children.append(("BranchJob", {
                "apiVersion": "branchmerge.io/v1alpha1", "kind": "BranchJob", "metadata": {"name": n},
                "spec": {"student": spec["student"], "datasets": branch["datasets"], "output": spec["output"]}}))
            children.append(("Pod", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": n + "-0"},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}))
            children.append(("Service", {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": n},
                "spec": {"clusterIP": "None", "selector": {"x": n}}}))

        async def one(kind: str, obj: dict) -> None:
            kopf.adopt(obj)
            try:
                await api.create(kind, namespace, obj)
            except Exception as e:
                if "409" not in str(e):
                    raise

        await asyncio.gather(*(one(k, o) for k, o in children))
        patch.status["phase"] = "Pending"
    '''
)


def distillation(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": {
            "student": {"uri": "s3://bench/student"},
            "output": {"uri": f"s3://bench/{name}"},
            "branches": [
                {"name": b, "datasets": [{"uri": f"s3://bench/{b}.jsonl"}], "training": {"globalBatchSize": 1},
                 "resources": {"gpusPerNode": 0, "cpu": "10m", "memory": "32Mi",
                               "nodeSelector": {"bench": "fake"}, "tolerations": [{"operator": "Exists"}]}}
                for b in BRANCHES
            ],
            "merge": {"resources": {"nodeSelector": {"bench": "fake"}, "tolerations": [{"operator": "Exists"}]}},
            "eval": {"benchmarks": [{"name": "arith", "kind": "math", "uri": "s3://bench/b.jsonl"}],
                     "models": ["merged"],
                     "resources": {"nodeSelector": {"bench": "fake"}, "tolerations": [{"operator": "Exists"}]}},
        },
    }


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cp = ControlPlane(workdir / "k8s")
        self.cluster = self.cp.start()
        self.kubectl = self.cluster.kubectl
        self.kubectl("apply", "-f", str(REPO / "manifests" / "crds"))
        for attempt in range(50):  # `wait` errors while a fresh CRD has no conditions yet
            res = self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/distillations.branchmerge.io",
                               "crd/branchjobs.branchmerge.io", check=attempt == 49)
            if "condition met" in res and res.count("condition met") == 2:
                break
            time.sleep(0.2)
        from kubernetes import client

        self.api = self.cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def namespace(self, name: str) -> str:
        self.core.create_namespace({"metadata": {"name": name}})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sa = self.core.list_namespaced_service_account(name).items
            if sa and sa[0].secrets:
                return name
            time.sleep(0.1)
        raise TimeoutError("default ServiceAccount")

    def drop_namespace(self, name: str, timeout: float = 300) -> None:
        """Delete a namespace and wait until it is gone, so the next phase starts clean."""
        from kubernetes.client.exceptions import ApiException

        self.core.delete_namespace(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(name)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(1)
        raise TimeoutError(f"namespace {name} still terminating")

    def count(self, ns: str) -> tuple[int, int, int]:
        bjs = self.custom.list_namespaced_custom_object("branchmerge.io", "v1alpha1", ns, "branchjobs")["items"]
        pods = self.core.list_namespaced_pod(ns).items
        svcs = self.core.list_namespaced_service(ns).items
        return len(bjs), len(pods), len(svcs)

    def create_all(self, ns: str, n: int) -> None:
        """Create N Distillations as fast as one client can (one request each, pipelined by threads)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: self.custom.create_namespaced_custom_object(
                "branchmerge.io", "v1alpha1", ns, "distillations", distillation(f"d{i:03d}")), range(n)))

    def apiserver_writes(self) -> dict[str, float]:
        """PATCH/PUT/POST/DELETE counts per resource from the API server's own metrics."""
        text = self.cluster.get("/metrics")
        out: dict[str, float] = {}
        for line in str(text).splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("verb") not in ("POST", "PATCH", "PUT", "DELETE", "CREATE", "UPDATE"):
                continue
            key = f"{labels.get('resource')}/{labels.get('subresource', '')}:{labels['verb']}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def run_operator(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), "PYTHONPATH": f"{REPO}:{REPO / 'operator'}"}
        with log.open("wb") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def close(self) -> None:
        self.api.close()
        self.cp.stop()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        out[k] = float(v)
    return out


def burst(b: Bench, ns: str, n: int, argv: list[str], log: Path, wait_ready: Any) -> dict[str, float]:
    """Create N Distillations at once with an operator running; time until 3N of each child exist."""
    proc = b.run_operator(argv, log)
    try:
        wait_ready(proc)
        ps = psutil.Process(proc.pid)
        cpu0 = sum(ps.cpu_times()[:2])
        rss_peak = ps.memory_info().rss
        t0 = time.monotonic()
        b.create_all(ns, n)
        created = time.monotonic() - t0
        want = 3 * n
        done = None
        while time.monotonic() - t0 < 300:
            rss_peak = max(rss_peak, ps.memory_info().rss)
            if b.count(ns) == (want, want, want):
                done = time.monotonic() - t0
                break
            time.sleep(0.1)
        time.sleep(2)  # let status writes settle before reading CPU/RSS
        rss_peak = max(rss_peak, ps.memory_info().rss)
        return {"seconds": done if done is not None else float("nan"), "submit_seconds": created,
                "cpu_seconds": sum(ps.cpu_times()[:2]) - cpu0, "rss_mb": rss_peak / 2**20}
    finally:
        stop(proc)


def wait_metrics(port: int) -> Any:
    def ready(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited with {proc.returncode}")
            try:
                scrape(port)
                time.sleep(1.0)  # indexes primed, watches started
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("operator metrics")

    return ready


def wait_log(log: Path, needle: str) -> Any:
    def ready(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if needle in log.read_text(errors="replace"):
                time.sleep(1.0)
                return
            time.sleep(0.2)
        raise TimeoutError(f"{needle!r} in {log}")

    return ready


def lifecycle(b: Bench, m: int, tmp: Path) -> dict[str, float]:
    """M Distillations from creation to Succeeded to deletion; writes per Distillation."""
    stages = FakeStages(tmp / "fake")
    kubelet = start_node(b.cluster, "bench-node", cpu="64", memory="256Gi", gpus=0, pods=4 * m + 10,
                         labels={"bench": "fake"}, extra_env=stages.env())
    ns = b.namespace("lifecycle")
    port = free_port()
    argv = [str(VENV_BIN / "branchmerge"), "operator", "-A", "--log-format", "plain", "--metrics-port", str(port),
            "--metrics-address", "127.0.0.1"]
    proc = b.run_operator(argv, tmp / "operator-lifecycle.log")
    try:
        wait_metrics(port)(proc)
        before_ours, before_server = scrape(port), b.apiserver_writes()
        t0 = time.monotonic()
        b.create_all(ns, m)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            items = b.custom.list_namespaced_custom_object("branchmerge.io", "v1alpha1", ns, "distillations")["items"]
            phases = [(i.get("status") or {}).get("phase") for i in items]
            if phases.count("Succeeded") == m:
                break
            if "Failed" in phases:
                raise RuntimeError(f"a Distillation failed: {json.dumps(items[phases.index('Failed')]['status'])[:800]}")
            time.sleep(0.5)
        else:
            raise TimeoutError("lifecycle Distillations did not finish")
        run_seconds = time.monotonic() - t0
        for i in range(m):
            b.custom.delete_namespaced_custom_object("branchmerge.io", "v1alpha1", ns, "distillations", f"d{i:03d}")
        # The operator's part of deletion is releasing its finalizers; Pods and Services then go
        # with the garbage collector (no operator writes), which is slow on a loaded machine.
        while b.count(ns)[0] or b.custom.list_namespaced_custom_object(
                "branchmerge.io", "v1alpha1", ns, "distillations")["items"]:
            time.sleep(0.5)
        time.sleep(2)
        after_ours, after_server = scrape(port), b.apiserver_writes()
    finally:
        stop(proc)
        kubelet.stop()
        b.core.delete_node("bench-node")

    def delta(metric: str, **want: str) -> float:
        total = 0.0
        for key, value in after_ours.items():
            name, _, rest = key.partition("{")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if name == metric and all(labels.get(k) == v for k, v in want.items()):
                total += value - before_ours.get(key, 0.0)
        return total

    def server(resource: str, verb: str) -> float:
        return after_server.get(f"{resource}/:{verb}", 0.0) - before_server.get(f"{resource}/:{verb}", 0.0)

    writes_ours = sum(delta("branchmerge_api_requests_total", verb=v) for v in ("POST", "PATCH", "PUT", "DELETE"))
    child_patches = delta("branchmerge_api_requests_total", verb="PATCH", resource="branchjobs")
    kopf_patches = server("distillations", "PATCH") + server("branchjobs", "PATCH") - child_patches
    events = delta("branchmerge_events_total")
    status_patches = sum(delta("branchmerge_api_requests_total", verb="PATCH", resource=f"{r}/status")
                         for r in ("distillations", "branchjobs"))
    return {
        "distillations": m, "seconds": run_seconds,
        "writes_operator": writes_ours / m, "writes_kopf": kopf_patches / m, "events": events / m,
        "status_patches": status_patches / m,
        "writes_total": (writes_ours + kopf_patches + events) / m,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--distillations", type=int, default=100)
    p.add_argument("--lifecycle", type=int, default=10)
    args = p.parse_args()
    n = args.distillations
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as d:
        tmp = Path(d)
        b = Bench(tmp)
        try:
            # Lifecycle first, on a fresh control plane; then the bursts with no node at all.
            life = lifecycle(b, args.lifecycle, tmp)
            print(f"lifecycle: {json.dumps(life)}", flush=True)
            (tmp / "minimal_operator.py").write_text(MINIMAL)
            b.drop_namespace("lifecycle")
            floor = burst(b, b.namespace("floor"), n,
                          [str(VENV_BIN / "kopf"), "run", "--standalone", "-n", "floor", str(tmp / "minimal_operator.py")],
                          tmp / "minimal.log", wait_log(tmp / "minimal.log", "Initial authentication has finished"))
            print(f"floor burst: {json.dumps(floor)}", flush=True)
            b.drop_namespace("floor")  # its BranchJobs would be ours to reconcile otherwise
            port = free_port()
            ours = burst(b, b.namespace("burst"), n,
                         [str(VENV_BIN / "branchmerge"), "operator", "-A", "--log-format", "plain",
                          "--metrics-port", str(port), "--metrics-address", "127.0.0.1"],
                         tmp / "operator.log", wait_metrics(port))
            print(f"branchmerge burst: {json.dumps(ours)}", flush=True)
            b.drop_namespace("burst")
            port = free_port()
            quiet = burst(b, b.namespace("quiet"), n,
                          [str(VENV_BIN / "branchmerge"), "operator", "-A", "--log-format", "plain", "--no-events",
                           "--metrics-port", str(port), "--metrics-address", "127.0.0.1"],
                          tmp / "operator-quiet.log", wait_metrics(port))
            print(f"branchmerge --no-events burst: {json.dumps(quiet)}", flush=True)
        finally:
            b.close()
    children = 9 * n
    print(f"\nburst: {n} Distillations x 3 branches -> {children} children (BranchJobs, Pods, Services)")
    print(f"{'operator':<26}{'all exist (s)':>14}{'ms/child':>10}{'CPU s':>8}{'RSS MB':>8}")
    for name, r in (("minimal kopf (floor)", floor), ("branchmerge", ours), ("branchmerge --no-events", quiet)):
        print(f"{name:<26}{r['seconds']:>14.2f}{1000 * r['seconds'] / children:>10.2f}{r['cpu_seconds']:>8.1f}{r['rss_mb']:>8.0f}")
    print(f"\nlifecycle of {life['distillations']} Distillations (create -> Succeeded -> delete), per Distillation:")
    print(f"  operator client writes {life['writes_operator']:.1f} (of which status patches {life['status_patches']:.1f}), "
          f"kopf finalizer/annotation patches {life['writes_kopf']:.1f}, events {life['events']:.1f} "
          f"-> total {life['writes_total']:.1f}")
    ratio = ours["seconds"] / floor["seconds"] if floor["seconds"] else float("nan")
    print(
        f"burst {n} Distillations -> {children} children; floor {floor['seconds']:.2f} s; "
        f"writes per lifecycle: operator {life['writes_operator']:.1f}, kopf {life['writes_kopf']:.1f}, "
        f"events {life['events']:.1f}"
    )
    print(f"RESULT operator_burst_all_children_seconds {ours['seconds']:.2f} goal <= 10")
    print(f"RESULT operator_burst_vs_minimal_kopf {ratio:.2f} goal <= 2")
    print(f"RESULT operator_writes_per_distillation {life['writes_total']:.1f} goal <= 50")
    print(f"RESULT operator_rss_mb {ours['rss_mb']:.0f} goal <= 200")
    return 0


if __name__ == "__main__":
    sys.exit(main())

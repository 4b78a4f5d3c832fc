"""Helpers shared by the operator's integration and end-to-end tests (no tests here).

* `OperatorProcess`: `branchmerge operator` as a subprocess (the real entry point), which a
  test can SIGKILL and start again; its log and /metrics are at hand.
* `InProcessOperator`: the same handlers under `kopf.testing.KopfRunner`, with a log reader
  that reads the process kubelet's files (this kubelet serves no log API), so progress
  reporting is observable.
* A fake `branchmerge-train` for gang/policy scenarios that need pods, not training: it
  honours the stage contract (config from env, progress lines, result in the termination
  message) and obeys per-pod instructions dropped in a directory by the test.
* Tiny model and data uploads to the radosgw bucket for the real stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster import Cluster, S3Server
from tests.cluster.procs import free_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION = "branchmerge.io", "v1alpha1"
VENV_BIN = Path(sys.executable).parent


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 120, interval: float = 0.3,
             debug: Callable[[], str] | None = None) -> T:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ""
            if debug is not None:
                try:
                    extra = "\n" + debug()
                except Exception as e:  # debugging output must not hide the timeout
                    extra = f"\n(debug failed: {e})"
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def install_crds(cluster: Cluster) -> None:
    """Apply the generated CRDs (idempotent) and wait until both are Established."""
    cluster.kubectl("apply", "-f", str(REPO / "manifests" / "crds"))
    for attempt in range(50):  # `wait` errors while a fresh CRD has no conditions yet
        out = cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/distillations.branchmerge.io",
                              "crd/branchjobs.branchmerge.io", check=attempt == 49)
        if out.count("condition met") == 2:
            return
        time.sleep(0.2)


# --------------------------------------------------------------------------- API shortcuts


class Api:
    """Typed-enough shortcuts over the official client for assertions."""

    def __init__(self, api_client: Any) -> None:
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, plural: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)
        return obj

    def patch(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, plural, name, patch)

    def delete(self, plural: str, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, plural, name)

    def list(self, plural: str, ns: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
        return items

    def pods(self, ns: str, selector: str = "app.kubernetes.io/managed-by=branchmerge") -> list[Any]:
        return list(self.core.list_namespaced_pod(ns, label_selector=selector).items)

    def jobs(self, ns: str) -> list[Any]:
        return list(self.batch.list_namespaced_job(ns, label_selector="app.kubernetes.io/managed-by=branchmerge").items)

    def events(self, ns: str) -> list[Any]:
        return list(self.core.list_namespaced_event(ns).items)

    def condition(self, plural: str, ns: str, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.get(plural, ns, name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def phase(self, plural: str, ns: str, name: str) -> str | None:
        return ((self.get(plural, ns, name) or {}).get("status") or {}).get("phase")


def wait_events(api: Api, ns: str, name: str, *reasons: str, timeout: float = 30) -> list[str]:
    """Reasons of the events on ``name`` once all of ``reasons`` are among them (kopf posts
    events asynchronously, after the status that triggered them is written)."""
    def seen() -> list[str] | None:
        got = [e.reason for e in api.events(ns) if e.involved_object.name == name]
        return got if all(r in got for r in reasons) else None

    return wait_for(f"events {', '.join(reasons)} on {name}", seen, timeout)


def describe(api: Api, ns: str) -> str:
    """What a failing wait prints: our resources' status, pods and recent events."""
    lines = []
    for plural in ("distillations", "branchjobs"):
        for obj in api.list(plural, ns):
            st = obj.get("status") or {}
            conds = {c["type"]: f"{c['status']}/{c['reason']}" for c in st.get("conditions") or []}
            lines.append(f"{plural}/{obj['metadata']['name']}: phase={st.get('phase')} {conds} msg={st.get('message')}")
    for pod in api.pods(ns, ""):
        cs = (pod.status.container_statuses or [None])[0]
        lines.append(f"pod/{pod.metadata.name}: {pod.status.phase} {cs.state if cs else ''}")
    for ev in sorted(api.events(ns), key=lambda e: str(e.last_timestamp or e.event_time or ""))[-15:]:
        lines.append(f"event {ev.involved_object.kind}/{ev.involved_object.name}: {ev.reason}: {ev.message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- operators


class OperatorProcess:
    """`branchmerge operator -A` as a subprocess with its own metrics port and log file."""

    def __init__(self, cluster: Cluster, log_path: Path, *, kubeconfig: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.cluster = cluster
        self.log_path = log_path
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the operator needs no storage credentials
            env.pop(k, None)
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts + 1} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "branchmerge"), "operator", "--all-namespaces", "--log-format", "plain",
             "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.starts += 1
        wait_for("operator metrics endpoint", self._metrics_up, timeout=60, debug=self.tail)
        return self

    def _metrics_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            self.metrics()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer removal — the harshest restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of one metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])


@contextmanager
def in_process_operator(cluster: Cluster, *, progress_interval: float = 1.0) -> Iterator[Any]:
    """The handlers under KopfRunner. Progress is read as in production: ``GET pods/log``
    through the API server, which the process kubelet serves (tests/cluster/kubelet_api.py)."""
    from kopf.testing import KopfRunner

    from branchmerge_operator import handlers
    from branchmerge_operator.reconcile import OperatorConfig

    saved = handlers.CONFIG
    handlers.CONFIG = OperatorConfig(metrics_port=None, progress_interval=progress_interval)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        with KopfRunner(["run", "--all-namespaces", "--standalone", "-m", "branchmerge_operator.handlers"],
                        timeout=60) as runner:  # fmt: skip
            wait_for("in-process operator", lambda: handlers._state.runtime is not None, timeout=30)
            yield runner
    finally:
        handlers.CONFIG = saved
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


# --------------------------------------------------------------------------- fake stage

FAKE_STAGE = textwrap.dedent(
    '''\
    #!{python}
    """A stand-in for branchmerge-train honouring the stage contract; obeys $FAKE_CONTROL/<pod>."""
    import json, os, sys, time
    cfg = json.loads(os.environ["BRANCHMERGE_STAGE"])
    pod = os.environ.get("POD_NAME", "?")
    control = os.environ.get("FAKE_CONTROL", "/nonexistent")
    def instruction():
        for name in (pod, cfg["name"], "all"):
            p = os.path.join(control, name)
            if os.path.exists(p):
                return open(p).read().split()
        return []
    def result(status, **extra):
        body = {{"apiVersion": "branchmerge.io/v1alpha1", "kind": cfg["kind"], "status": status,
                 "fingerprint": cfg["fingerprint"], **extra}}
        with open(cfg.get("resultPath", "/dev/termination-log"), "w") as f:
            json.dump(body, f)
    total = 10
    for step in range(1, total + 1):
        todo = instruction()
        if todo[:1] == ["fail"]:
            result("Failed", error={{"reason": "InternalError", "message": "fake failure on " + pod}})
            sys.exit(1)
        if todo[:1] == ["invalid"]:
            result("Failed", error={{"reason": "InvalidInput", "message": "bad data in " + pod}})
            sys.exit(1)
        print("BRANCHMERGE_PROGRESS " + json.dumps({{"step": step, "totalSteps": total, "loss": 1.0 / step,
              "tokensPerSecond": 100.0, "etaSeconds": float(total - step)}}), flush=True)
        if todo[:1] == ["hold"] or (todo[:1] == ["slow"]):
            time.sleep(float(todo[1]) if len(todo) > 1 else 0.5)
        if todo[:1] == ["hold"]:
            while instruction()[:1] == ["hold"]:
                time.sleep(0.2)
    scores = []
    if cfg["kind"] == "Eval":
        scores = [{{"model": m, "benchmark": b["name"], "score": 0.5, "samples": 2}}
                  for m in cfg["models"] for b in cfg["benchmarks"]]
    result("Succeeded", output=cfg["output"], metrics={{"steps": float(total)}}, scores=scores)
    '''
)


class FakeStages:
    """A directory with the fake `branchmerge-train` and the per-pod instruction files.

    Instructions (file named after the pod, the stage name or `all`): `hold` (run until the
    file changes), `slow SECONDS` (per step), `fail`, `invalid`; no file: succeed at once."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.control = root / "control"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.control.mkdir(parents=True, exist_ok=True)
        script = self.bin / "branchmerge-train"
        script.write_text(FAKE_STAGE.format(python=sys.executable))
        script.chmod(0o755)

    def env(self) -> dict[str, str]:
        """Node-level env for a process kubelet: our bin first on PATH, and the control dir."""
        return {"PATH": f"{self.bin}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "FAKE_CONTROL": str(self.control)}

    def set(self, who: str, instruction: str) -> None:
        (self.control / who).write_text(instruction)

    def clear(self, who: str) -> None:
        (self.control / who).unlink(missing_ok=True)


# --------------------------------------------------------------------------- tiny model + data

_MODEL_CACHE: dict[str, Path] = {}


def tiny_student(root: Path) -> Path:
    """A ~50k-parameter Qwen2 + 512-token tokenizer, built once per session."""
    if "student" not in _MODEL_CACHE:
        from branchmerge_trainer.tiny import build_model, build_tokenizer, sample_corpus

        out = root / "student"
        tok = build_tokenizer(sample_corpus(), vocab_size=512)
        model = build_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        _MODEL_CACHE["student"] = out
    return _MODEL_CACHE["student"]


def chats(n: int, seed: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        a, b = (i * 7 + seed) % 97, (i * 13 + seed) % 89
        out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                 {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think>\\boxed{{{a + b}}}"}]})  # fmt: skip
    return out


def upload_inputs(s3: S3Server, bucket: str, student_dir: Path) -> dict[str, str]:
    """Student model, two domains' trajectories and a 4-problem math benchmark in the bucket."""
    s3c = s3.client()
    for f in student_dir.iterdir():
        s3c.upload_file(str(f), bucket, f"models/student/{f.name}")
    for domain, seed in (("math", 0), ("code", 5)):
        body = "".join(json.dumps(r) + "\n" for r in chats(24, seed))
        s3c.put_object(Bucket=bucket, Key=f"data/{domain}/train.jsonl", Body=body.encode())
    bench = "".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n" for a in range(1, 5))
    s3c.put_object(Bucket=bucket, Key="data/math/bench.jsonl", Body=bench.encode())
    return {
        "student": f"s3://{bucket}/models/student",
        "math": f"s3://{bucket}/data/math/train.jsonl",
        "code": f"s3://{bucket}/data/code/train.jsonl",
        "bench": f"s3://{bucket}/data/math/bench.jsonl",
    }


TINY_TRAINING = {
    "epochs": 1, "maxSteps": 4, "globalBatchSize": 4, "microBatchSize": 2, "maxSequenceLength": 128,
    "learningRate": 1.0e-3, "schedule": "constant", "warmupRatio": 0.0, "packing": "neat",
    "gradientCheckpointing": False, "zeroStage": 0, "precision": "fp32", "checkpointInterval": 2,
}  # fmt: skip


def keys(s3: S3Server, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return out


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> str:
    """`kubectl apply` (the path users take), returning kubectl's output."""
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))

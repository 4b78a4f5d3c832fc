"""``python -m tests.cluster up|down|env|status`` — the test control plane for manual exploration.

``up`` starts a detached supervisor (``serve``) that runs etcd, the control plane, one
process-kubelet node and (with ``--s3``) radosgw, and prints the environment to use it;
``down`` stops the supervisor by its PID, which tears everything down. State lives in
``--dir`` (default ``$BRANCHMERGE_CLUSTER_DIR`` or ``/tmp/branchmerge-cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .controlplane import ControlPlane, HarnessNotBuilt, tools_dir
from .procs import stop_pid, tail
from .s3 import Radosgw, S3NotAvailable

DEFAULT_DIR = Path(os.environ.get("BRANCHMERGE_CLUSTER_DIR", "/tmp/branchmerge-cluster"))


def _state(d: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["supervisor_pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return None
    return state


def _env_lines(state: dict[str, Any]) -> list[str]:
    lines = [
        f"export KUBECONFIG={shlex.quote(state['kubeconfig'])}",
        f"export PATH={shlex.quote(str(tools_dir()))}:$PATH",
    ]
    if state.get("s3"):
        for k, v in state["s3"]["env"].items():
            lines.append(f"export {k}={shlex.quote(v)}")
    return lines


def serve(args: argparse.Namespace) -> int:
    """Run everything in the foreground until SIGTERM/SIGINT; write state.json once ready."""
    from .fixtures import start_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    d: Path = args.dir
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    shutil.rmtree(d / "k8s", ignore_errors=True)
    shutil.rmtree(d / "s3", ignore_errors=True)
    t0 = time.monotonic()
    cp = ControlPlane(d / "k8s")
    rgw: Radosgw | None = None
    kubelet = None
    try:
        cluster = cp.start()
        cp_s = time.monotonic() - t0
        kubelet = start_node(cluster, args.node, cpu=args.cpu, memory=args.memory, gpus=args.gpus)
        ready_s = time.monotonic() - t0
        state: dict[str, Any] = {
            **cluster.to_json(),
            "supervisor_pid": os.getpid(),
            "node": args.node,
            "control_plane_start_s": round(cp_s, 2),
            "ready_s": round(ready_s, 2),
            "kubelet_workdir": str(kubelet.workdir),
        }
        if args.s3:
            t1 = time.monotonic()
            rgw = Radosgw(d / "s3")
            s3 = rgw.start()
            state["s3"] = {
                "endpoint": s3.endpoint,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key,
                "env": s3.env(),
                "pids": s3.pids,
                "start_s": round(time.monotonic() - t1, 2),
            }
        time.sleep(2)  # let components settle before measuring memory
        state["rss_mib"] = cluster.rss_mib()
        if rgw is not None and rgw.server is not None:
            state["s3"]["rss_mib"] = rgw.server.rss_mib()
        (d / "state.json").write_text(json.dumps(state, indent=2))
        while not stop.wait(1.0):
            dead = cp.dead() or (rgw.dead() if rgw else None)
            if dead:
                print(f"component died: {dead}", file=sys.stderr)
                return 1
        return 0
    finally:
        with contextlib.suppress(OSError):
            (d / "state.json").unlink()
        if kubelet is not None:
            kubelet.stop()
        if rgw is not None:
            rgw.stop()
        cp.stop()


def up(args: argparse.Namespace) -> int:
    d: Path = args.dir
    state = _state(d)
    if state is None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "tests.cluster", "serve", "--dir", str(d), "--node", args.node,
                "--cpu", args.cpu, "--memory", args.memory, "--gpus", str(args.gpus)]  # fmt: skip
        if args.s3:
            argv.append("--s3")
        repo = Path(__file__).resolve().parents[2]
        with open(d / "serve.log", "ab") as out:
            proc = subprocess.Popen(
                argv, cwd=repo, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + args.timeout
        while (state := _state(d)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_pid(proc.pid, grace=10)
                print(
                    f"cluster failed to start; {d / 'serve.log'}:\n{tail(d / 'serve.log', 40)}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
    print("\n".join(_env_lines(state)))
    s3 = state.get("s3") or {}
    print(
        f"# up: control plane {state['control_plane_start_s']} s, with node {state['ready_s']} s"
        + (f", radosgw {s3['start_s']} s" if s3 else "")
        + f"; RSS MiB {state['rss_mib']}"
        + (f" {s3['rss_mib']}" if s3 else ""),
        file=sys.stderr,
    )
    return 0


def down(args: argparse.Namespace) -> int:
    state = _state(args.dir)
    if state is None:
        print("no cluster running", file=sys.stderr)
        return 0
    stop_pid(int(state["supervisor_pid"]), grace=30)
    print("stopped", file=sys.stderr)
    return 0


def env(args: argparse.Namespace) -> int:
    state = _state(args.dir)
    if state is None:
        print("no cluster running; start one with `python -m tests.cluster up`", file=sys.stderr)
        return 1
    print("\n".join(_env_lines(state)))
    return 0


def status(args: argparse.Namespace) -> int:
    state = _state(args.dir)
    if state is None:
        print("no cluster running", file=sys.stderr)
        return 1
    kubectl = str(tools_dir() / "kubectl")
    return subprocess.call(
        [kubectl, f"--kubeconfig={state['kubeconfig']}", "get", "nodes,pods", "-A", "-o", "wide"]
    )


def measure(args: argparse.Namespace) -> int:
    """Start everything in this process, run one Job, print start times and RSS as JSON, stop."""
    import tempfile

    from kubernetes import client

    from .fixtures import start_node

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bm-measure-") as tmp:
        t0 = time.monotonic()
        cp = ControlPlane(Path(tmp) / "k8s")
        kubelet = None
        rgw = Radosgw(Path(tmp) / "s3") if args.s3 else None
        try:
            cluster = cp.start()
            out["control_plane_start_s"] = round(time.monotonic() - t0, 2)
            kubelet = start_node(cluster, "node-1")
            out["with_node_s"] = round(time.monotonic() - t0, 2)
            with cluster.api_client() as api:
                batch = client.BatchV1Api(api)
                t1 = time.monotonic()
                job = {"metadata": {"name": "m"}, "spec": {"template": {"spec": {"restartPolicy": "Never",
                       "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}}}  # fmt: skip
                batch.create_namespaced_job("default", job)
                while not batch.read_namespaced_job("m", "default").status.succeeded:
                    time.sleep(0.05)
                out["job_create_to_complete_s"] = round(time.monotonic() - t1, 2)
            out["rss_mib"] = cluster.rss_mib()
            if rgw is not None:
                t2 = time.monotonic()
                s3 = rgw.start()
                out["radosgw_start_s"] = round(time.monotonic() - t2, 2)
                s3.client().create_bucket(Bucket="measure")
                out["radosgw_rss_mib"] = s3.rss_mib()
        finally:
            if kubelet is not None:
                kubelet.stop()
            t3 = time.monotonic()
            if rgw is not None:
                rgw.stop()
            cp.stop()
            out["stop_s"] = round(time.monotonic() - t3, 2)
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "serve"):
        sp = sub.add_parser(
            name, help="start (detached) a control plane + node" if name == "up" else argparse.SUPPRESS
        )
        sp.add_argument("--dir", type=Path, default=argparse.SUPPRESS)
        sp.add_argument("--s3", action="store_true", help="also start Ceph radosgw")
        sp.add_argument("--node", default="node-1")
        sp.add_argument("--cpu", default="16")
        sp.add_argument("--memory", default="64Gi")
        sp.add_argument("--gpus", type=int, default=8)
        sp.add_argument("--timeout", type=float, default=180)
    sub.add_parser("down", help="stop it (by PID)")
    sub.add_parser("env", help='print export lines (eval "$(python -m tests.cluster env)")')
    sub.add_parser("status", help="kubectl get nodes,pods -A")
    sp = sub.add_parser("measure", help="time a start + one Job, print RSS (figures for the README)")
    sp.add_argument("--s3", action="store_true", help="also start radosgw")
    args = p.parse_args(argv)
    try:
        return {"up": up, "serve": serve, "down": down, "env": env, "status": status, "measure": measure}[
            args.cmd
        ](args)
    except (HarnessNotBuilt, S3NotAvailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

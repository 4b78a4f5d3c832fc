"""`branchmerge operator`: run the kopf operator (what the Deployment's container runs).

Imported by `cli.py` to register the subcommand; kopf and the handlers are imported only when
the command runs, so `branchmerge validate` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS",
        help="watch this namespace (repeatable; glob patterns allowed, e.g. 'team-*')",
    )  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port; 0 disables (default 8080)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics server binds (default 0.0.0.0)")
    p.add_argument(
        "--liveness", default=None, metavar="URL",
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz (off by default)",
    )  # fmt: skip
    p.add_argument(
        "--peering", default=None, metavar="NAME",
        help="coordinate replicas through this kopf peering object (default: standalone, run one replica)",
    )  # fmt: skip
    p.add_argument(
        "--progress-interval", type=float, default=30.0, metavar="SECONDS",
        help="how often rank 0's log is read for training progress (default 30)",
    )  # fmt: skip
    p.add_argument("--no-events", action="store_true", help="do not post Kubernetes Events")
    p.add_argument(
        "--log-format", choices=("json", "plain", "full"), default="json",
        help="json: one object per line with the resource's namespace/name (default); plain/full: for humans",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


@command("operator", "run the Kubernetes operator (kopf) for Distillations and BranchJobs", _configure)
def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers
    from .reconcile import OperatorConfig
    from .workloads import default_trainer_image

    try:
        default_trainer_image()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clusterwide = not args.namespace
    handlers.CONFIG = OperatorConfig(
        namespaces=list(args.namespace),
        clusterwide=clusterwide,
        metrics_port=args.metrics_port or None,
        metrics_address=args.metrics_address,
        liveness=args.liveness,
        progress_interval=args.progress_interval,
        peering=args.peering,
        post_events=not args.no_events,
    )
    formats = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(verbose=args.verbose, log_format=formats[args.log_format], log_refkey="object")
    if not args.verbose:
        # kopf logs every handler run at INFO ("Handler 'pod_event' succeeded") — one line per
        # watch event. Our reconcilers log what matters (transitions, events, failures).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=clusterwide,
        namespaces=list(args.namespace),
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0

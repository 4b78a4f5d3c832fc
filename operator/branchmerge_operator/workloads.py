"""Stage configs -> the Pods, Services and Jobs that run them (plain dicts, no I/O).

Why a module of its own: what a stage pod looks like (security context, volumes, torchrun
environment, Kueue labels, where credentials come from) is policy that the planner should not
care about and the handlers should not improvise. Everything here is a pure function of its
arguments, so unit tests pin the security properties of every pod the operator creates.

How a stage receives its config: the JSON of the stage config travels in the environment
variable ``BRANCHMERGE_STAGE`` and the container runs ``branchmerge-train <stage> --config
env:BRANCHMERGE_STAGE``. No ConfigMap is needed (one object fewer per stage to create,
watch and clean up) and the config is visible with ``kubectl get pod -o yaml``; it never
holds credentials (the stage contract forbids them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from branchmerge_trainer.stages import EvalStage, MergeStage, SFTStage

from .api import DEFAULT_IMAGE, BranchJob, BranchJobSpec, ImageSpec, Placement
from .gang import GangPod, GangService
from .naming import (
    LABEL_BRANCH,
    LABEL_BRANCHJOB,
    LABEL_DISTILLATION,
    LABEL_FINGERPRINT,
    LABEL_STAGE,
    MANAGED_BY,
    MASTER_PORT,
)
from .pipeline import StageJob

#: The environment variable carrying the stage config (JSON).
STAGE_ENV = "BRANCHMERGE_STAGE"
#: The one container of every stage pod.
CONTAINER = "trainer"
#: Writable scratch space (checkpoint staging, downloaded models); the root filesystem is read-only.
WORKDIR = "/scratch"
TERMINATION_LOG = "/dev/termination-log"
#: Non-root user of the trainer image (trainer_image/Dockerfile).
RUN_AS_USER = 10001
#: Seconds a stage pod gets to stop after SIGTERM (a checkpoint upload in flight may finish).
GRACE_SECONDS = 30

#: The operator's default trainer image (the Deployment sets it from Helm `trainer.image` or
#: the kustomize base); a Distillation's `spec.image.image` wins over it.
TRAINER_IMAGE_ENV = "BRANCHMERGE_TRAINER_IMAGE"

StageKind = Literal["branch", "merge", "eval"]


def default_trainer_image(environ: Mapping[str, str] | None = None) -> str:
    """The image of stage pods whose spec names none: $BRANCHMERGE_TRAINER_IMAGE, else the
    release's own. A malformed value is an installation error: refuse it by name."""
    value = (os.environ if environ is None else environ).get(TRAINER_IMAGE_ENV, "").strip()
    if not value:
        return DEFAULT_IMAGE
    if not re.fullmatch(r"\S+", value):
        raise ValueError(
            f"{TRAINER_IMAGE_ENV}={value!r} is not an image reference (no spaces allowed); "
            "set it to e.g. ghcr.io/branchmerge/trainer:0.1.0 or unset it"
        )
    return value
_SUBCOMMAND: dict[str, str] = {"SFT": "sft", "Merge": "merge", "Eval": "eval"}


@dataclass(frozen=True)
class PodSettings:
    """What every pod of one stage carries, taken from the user's spec."""

    image: ImageSpec = field(default_factory=ImageSpec)
    #: used when `image.image` is unset (read from the operator's environment once per pod)
    default_image: str = field(default_factory=default_trainer_image)
    placement: Placement = field(default_factory=Placement)
    gpus: int = 0
    credentials_secret: str | None = None
    queue_name: str | None = None


# --------------------------------------------------------------------------- labels


def child_labels(
    stage: StageKind,
    *,
    distillation: str | None = None,
    branch: str | None = None,
    branchjob: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, str]:
    """The labels the operator selects its children by (and finds them again after a restart)."""
    labels = dict(MANAGED_BY)
    labels[LABEL_STAGE] = stage
    if distillation:
        labels[LABEL_DISTILLATION] = distillation
    if branch:
        labels[LABEL_BRANCH] = branch
    if branchjob:
        labels[LABEL_BRANCHJOB] = branchjob
    if fingerprint:
        labels[LABEL_FINGERPRINT] = fingerprint[:63]
    return labels


# --------------------------------------------------------------------------- pod parts


def stage_json(stage: SFTStage | MergeStage | EvalStage) -> str:
    """The config exactly as the workload parses it (camelCase, unset fields left out)."""
    return json.dumps(stage.dump(), separators=(",", ":"), sort_keys=True)


def _env(name: str, value: str | int) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _base_env(stage: SFTStage | MergeStage | EvalStage) -> list[dict[str, Any]]:
    """Config, writable paths and unbuffered output (progress lines must reach the log at once)."""
    return [
        _env(STAGE_ENV, stage_json(stage)),
        _env("BRANCHMERGE_WORKDIR", WORKDIR),
        _env("TMPDIR", "/tmp"),
        _env("HOME", "/tmp"),
        _env("HF_HOME", f"{WORKDIR}/hf"),
        _env("XDG_CACHE_HOME", f"{WORKDIR}/cache"),
        _env("PYTHONUNBUFFERED", "1"),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]


def _resources(placement: Placement, gpus: int) -> dict[str, Any]:
    """Requests from the spec; memory is also the limit (no overcommit of host RAM); GPUs are
    an extended resource, so request == limit."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if placement.cpu is not None:
        requests["cpu"] = str(placement.cpu)
    if placement.memory is not None:
        requests["memory"] = limits["memory"] = str(placement.memory)
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable emptyDirs on a read-only root: scratch, /tmp and a memory-backed /dev/shm
    (NCCL and DataLoader workers need far more shared memory than a runtime's 64 MiB default)."""
    volumes = [
        {"name": "scratch", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "scratch", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def pod_spec(
    settings: PodSettings,
    command: list[str],
    env: list[dict[str, Any]],
    *,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The hardened pod spec every stage runs in.

    No service-account token (stages talk to storage, never to Kubernetes), non-root, no
    privilege escalation, no capabilities, RuntimeDefault seccomp, read-only root filesystem,
    and storage credentials only as environment from the referenced Secret.
    """
    volumes, mounts = _volumes()
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image.image or settings.default_image,
        "imagePullPolicy": settings.image.pull_policy,
        "command": command,
        "env": env,
        "resources": _resources(settings.placement, settings.gpus),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        # A stage that dies before writing its result (import error, OOM) still leaves a clue.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.credentials_secret}}]
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    placement = settings.placement
    if placement.node_selector:
        spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in placement.tolerations]
    if placement.priority_class_name:
        spec["priorityClassName"] = placement.priority_class_name
    if settings.image.pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in settings.image.pull_secrets]
    return spec


# --------------------------------------------------------------------------- gang (BranchJob)


def settings_for_branchjob(spec: BranchJobSpec) -> PodSettings:
    return PodSettings(
        image=spec.image,
        placement=spec.resources,
        gpus=spec.resources.gpus_per_node,
        credentials_secret=spec.output.credentials_secret,
        queue_name=spec.queue_name,
    )


def settings_for_job(job: StageJob) -> PodSettings:
    return PodSettings(
        image=job.image,
        placement=job.resources,
        gpus=job.resources.gpus,
        credentials_secret=job.output.credentials_secret,
        queue_name=job.queue_name,
    )


def torchrun_env(planned: Mapping[str, str], rank: int, nnodes: int, nproc_per_node: int) -> list[dict[str, Any]]:
    """torch.distributed rendezvous through the gang's headless Service (rank 0's DNS name).

    The planner supplies ``MASTER_ADDR``/``MASTER_PORT``/``NNODES``/``NODE_RANK``/
    ``NPROC_PER_NODE`` and their ``PET_*`` twins (torchrun reads those as defaults for its
    flags, as in Kubeflow's PyTorchJob); ``WORLD_SIZE`` is added here. With one process per
    pod no torchrun agent runs, so ``RANK``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` are set too.
    """
    env = {k: str(v) for k, v in planned.items()}
    env.setdefault("MASTER_PORT", str(MASTER_PORT))
    env["WORLD_SIZE"] = str(nnodes * nproc_per_node)
    if nproc_per_node == 1:
        env.update(RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    return [_env(k, v) for k, v in env.items()]


def sft_command(nproc_per_node: int) -> list[str]:
    """One process per pod runs the stage directly; several GPUs per pod go through torchrun
    with a static rendezvous at rank 0 and no elastic restarts (the operator restarts gangs)."""
    stage_args = ["sft", "--config", f"env:{STAGE_ENV}"]
    if nproc_per_node == 1:
        return ["branchmerge-train", *stage_args]
    return [
        "torchrun",
        "--nnodes=$(NNODES)",
        "--node-rank=$(NODE_RANK)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
        "-m",
        "branchmerge_trainer.cli",
        *stage_args,
    ]


def gang_pod(planned: GangPod, *, namespace: str, stage: SFTStage, settings: PodSettings) -> dict[str, Any]:
    """The Pod of one rank of one gang attempt, as the planner named and labelled it.

    ``hostname``/``subdomain`` give it the DNS name ``<pod>.<service>`` that every rank's
    ``MASTER_ADDR`` points at (rank 0); Kueue's queue and pod-group labels and the group-size
    annotation come from the planner and are on every pod, so the gang is admitted whole.
    """
    nnodes = stage.distributed.nnodes
    nproc = stage.distributed.nproc_per_node
    spec = pod_spec(
        settings,
        sft_command(nproc),
        _base_env(stage) + torchrun_env(planned.env, planned.rank, nnodes, nproc),
        ports=[{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}],
    )
    spec["hostname"] = planned.hostname
    spec["subdomain"] = planned.subdomain
    metadata: dict[str, Any] = {"name": planned.name, "namespace": namespace, "labels": dict(planned.labels)}
    if planned.annotations:
        metadata["annotations"] = dict(planned.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def gang_service(planned: GangService, *, namespace: str) -> dict[str, Any]:
    """Headless Service of a gang: DNS for every rank, published before pods are Ready
    (rendezvous happens before any readiness could be reported)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": planned.name, "namespace": namespace, "labels": dict(planned.labels)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(planned.selector),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


# --------------------------------------------------------------------------- merge / eval Jobs


def stage_job(planned: StageJob, *, namespace: str, active_deadline_seconds: int | None = None) -> dict[str, Any]:
    """A ``batch/v1`` Job running ``branchmerge-train merge|eval`` once (retried by the Job
    controller up to ``backoffLimit``).

    Kueue admits a Job by the queue label on the Job itself (its Job integration); the pod
    template carries our labels but neither the queue nor a pod-group label, so Kueue's
    plain-pod integration leaves the Job's pods alone.
    """
    stage = planned.stage
    command = ["branchmerge-train", _SUBCOMMAND[stage.kind], "--config", f"env:{STAGE_ENV}"]
    pod_labels = {k: v for k, v in planned.labels.items() if not k.startswith("kueue.x-k8s.io/")}
    job_spec: dict[str, Any] = {
        "backoffLimit": planned.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": pod_spec(settings_for_job(planned), command, _base_env(stage)),
        },
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = active_deadline_seconds
    metadata: dict[str, Any] = {"name": planned.name, "namespace": namespace, "labels": dict(planned.labels)}
    if planned.annotations:
        metadata["annotations"] = dict(planned.annotations)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def branchjob_body(bj: BranchJob) -> dict[str, Any]:
    """A planned BranchJob as the API expects it (no status: that subresource is ours later)."""
    body = bj.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"status"})
    body["metadata"] = {k: v for k, v in body["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
    return body

"""Names, labels and storage paths of everything the control plane derives.

Why one module: the API validates name lengths against the children it will create, the
planner names those children, and the operator finds them again after a restart by the same
names and labels. Keeping the rules side by side keeps them consistent.
"""

from __future__ import annotations

from typing import Literal

GROUP = "branchmerge.io"
VERSION = "v1alpha1"
API_VERSION: Literal["branchmerge.io/v1alpha1"] = "branchmerge.io/v1alpha1"

#: RFC 1035 label: Service names (the gang's headless Service is named after its BranchJob).
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1123 label: branch and step names (they appear inside other names, never first).
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1123 subdomain: Secret, PriorityClass and queue names.
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

#: A hostname label (pod name) is at most 63 characters.
MAX_LABEL = 63
#: Ranks are 0..MAX_NODES-1, so a rank suffix is at most 3 digits.
MAX_NODES = 256
#: `<branchjob>-<rank>` must fit a label: 63 - len("-255").
MAX_BRANCHJOB_NAME = MAX_LABEL - 4
#: Branch names are short so that `<distillation>-<branch>` fits MAX_BRANCHJOB_NAME.
MAX_BRANCH_NAME = 20
#: 59 - len("-") - 20.
MAX_DISTILLATION_NAME = MAX_BRANCHJOB_NAME - 1 - MAX_BRANCH_NAME
#: Merge step names travel in labels and stage names only.
MAX_STEP_NAME = 40

#: Words with a meaning of their own inside merge steps and eval model lists.
RESERVED_NAMES = frozenset({"student", "previous", "merged", "branches", "merge", "eval", "base"})

# Labels and annotations the operator puts on its children (and selects them by).
LABEL_DISTILLATION = f"{GROUP}/distillation"
LABEL_BRANCH = f"{GROUP}/branch"
LABEL_STAGE = f"{GROUP}/stage"  # branch | merge | eval
LABEL_FINGERPRINT = f"{GROUP}/fingerprint"
LABEL_BRANCHJOB = f"{GROUP}/branch-job"
LABEL_RANK = f"{GROUP}/rank"
LABEL_ATTEMPT = f"{GROUP}/attempt"
#: The Distillation generation a child was created for: a failed child created for an older
#: generation is retried once the spec changes ("terminal until the spec changes").
ANNOTATION_GENERATION = f"{GROUP}/distillation-generation"
MANAGED_BY = {"app.kubernetes.io/managed-by": "branchmerge", "app.kubernetes.io/part-of": "branchmerge"}

# Kueue admission (plain pods are admitted as a pod group).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"

#: torch.distributed rendezvous port on rank 0.
MASTER_PORT = 29500


def branchjob_name(distillation: str, branch: str) -> str:
    """The BranchJob a Distillation creates for one branch (stable across operator restarts)."""
    return f"{distillation}-{branch}"


def merge_job_name(distillation: str, fingerprint: str) -> str:
    """The merge Job; the fingerprint suffix makes a changed merge a new Job, not an update."""
    return f"{distillation}-merge-{fingerprint[:8]}"


def eval_job_name(distillation: str, fingerprint: str) -> str:
    return f"{distillation}-eval-{fingerprint[:8]}"


def pod_name(branchjob: str, rank: int) -> str:
    """Gang pods are named by rank, so a gang is recreated under the same names."""
    return f"{branchjob}-{rank}"


def service_name(branchjob: str) -> str:
    """The headless Service that gives every rank a DNS name for rendezvous."""
    return branchjob


def pod_group_name(branchjob: str, attempt: int) -> str:
    """Kueue pod group: one per gang attempt, so a restarted gang is admitted as a whole."""
    return f"{branchjob}-g{attempt}"


def master_addr(branchjob: str) -> str:
    """Rank 0's DNS name inside the namespace (`<pod>.<service>`)."""
    return f"{pod_name(branchjob, 0)}.{service_name(branchjob)}"


def join_uri(root: str, *parts: str) -> str:
    """Join a storage prefix and path parts with single slashes."""
    out = root.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def branch_prefix(root: str, branch: str, fingerprint: str) -> str:
    return join_uri(root, "branches", branch, fingerprint)


def branch_output(root: str, branch: str, fingerprint: str) -> str:
    """`<output>/branches/<branch>/<fingerprint>/model`."""
    return join_uri(branch_prefix(root, branch, fingerprint), "model")


def branch_checkpoints(root: str, branch: str, fingerprint: str) -> str:
    """Checkpoints live beside the model, so a restarted gang resumes from them."""
    return join_uri(branch_prefix(root, branch, fingerprint), "checkpoints")


def merge_output(root: str, fingerprint: str) -> str:
    """`<output>/merge/<fingerprint>/model`."""
    return join_uri(root, "merge", fingerprint, "model")


def eval_output(root: str, fingerprint: str) -> str:
    """`<output>/eval/<fingerprint>/results`."""
    return join_uri(root, "eval", fingerprint, "results")

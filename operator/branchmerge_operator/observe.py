"""What the operator has seen: slim copies of watched objects, read-your-writes, progress lines.

Why a module: the planner wants a consistent picture of one parent and its children, but a
watch delivers the operator's own writes a moment later. A reconcile that runs in between
(another child event, a timer) would otherwise act on a stale picture — count a failure
twice, re-emit an event, create a pod again. `Overlay` keeps what this operator just wrote
(created, patched, deleted) until the watch catches up, so every reconcile sees at least its
own writes. Everything here is synchronous and free of I/O, so it is unit-tested directly.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from branchmerge_trainer.stages import PROGRESS_PREFIX, Progress

from .api import check_manifest
from .naming import LABEL_ATTEMPT, LABEL_BRANCHJOB, LABEL_DISTILLATION, LABEL_RANK

Obj = dict[str, Any]

#: Text that must never reach a status, an event or a log line of ours, even when a stage
#: prints it: AWS-style access key ids and `secret...=value` pairs.
_SECRET_PATTERNS = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)((?:secret|password|token|session)[\w-]*\s*[=:]\s*)(\S+)"),
)


def redact(text: str | None, limit: int = 2048) -> str | None:
    """Mask credential-looking text and bound the length (messages go into status/events)."""
    if text is None:
        return None
    out = _SECRET_PATTERNS[0].sub("[REDACTED]", text)
    out = _SECRET_PATTERNS[1].sub(lambda m: m.group(1) + "[REDACTED]", out)
    return out if len(out) <= limit else out[: limit - 1] + "…"


# --------------------------------------------------------------------------- slim objects

_META_KEYS = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "annotations",
    "creationTimestamp",
    "deletionTimestamp",
    "ownerReferences",
)


def slim(body: Mapping[str, Any], *, keep_spec: bool = True) -> Obj:
    """What reconciles read (no managedFields, optionally no spec): indexes hold thousands of
    these, so the operator's memory stays flat as clusters grow.

    Nested values are shared with the watch event they came from, not copied: neither kopf nor
    this operator mutates an observed object (every change goes to the API as a patch), and a
    deep copy per watch event was the largest CPU cost at scale.
    """
    m = body.get("metadata") or {}
    out: Obj = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: m[k] for k in _META_KEYS if k in m},
    }
    if keep_spec and "spec" in body:
        out["spec"] = body["spec"]
    if "status" in body:
        out["status"] = body["status"]
    return out


def slim_pod(body: Mapping[str, Any]) -> Obj:
    """Pods: metadata and status only; termination messages are redacted on the way in (the
    statuses that carry one are copied, the rest shared)."""
    out = slim(body, keep_spec=False)
    status = out.get("status")
    if not isinstance(status, dict):
        return out
    statuses = status.get("containerStatuses") or []
    if not any(((cs.get(k) or {}).get("terminated") or {}).get("message") for cs in statuses for k in ("state", "lastState")):
        return out
    statuses = copy.deepcopy(statuses)
    for cs in statuses:
        for state_key in ("state", "lastState"):
            term = (cs.get(state_key) or {}).get("terminated")
            if isinstance(term, dict) and term.get("message"):
                term["message"] = redact(term["message"], 4096)
    out["status"] = {**status, "containerStatuses": statuses}
    return out


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return meta(obj).get("labels") or {}


def owned_by(obj: Mapping[str, Any], kind: str, name: str) -> bool:
    """The controller ownerReference points at ``kind``/``name`` (labels alone can be forged)."""
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("name") == name and ref.get("controller"):
            return True
    return False


def controller_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the controller ownerReference, if any."""
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


def resource_version(obj: Mapping[str, Any] | None) -> int | None:
    """resourceVersion as a number (etcd revision) when it is one; None when opaque."""
    rv = meta(obj or {}).get("resourceVersion")
    return int(rv) if isinstance(rv, str) and rv.isdigit() else None


def owner_view(obj: Mapping[str, Any]) -> Obj:
    """The parent as kopf.adopt should see it: identity only. Passing the full body would
    copy the parent's labels onto every child — and labels such as Argo CD's
    `app.kubernetes.io/instance` would make a GitOps tool adopt (and prune) our children."""
    m = meta(obj)
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {"name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid")},
    }


# --------------------------------------------------------------------------- index keys

Key = tuple[str, str]  # (namespace, name)


def pod_owner_key(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """Gang pods are keyed by BranchJob, merge/eval pods by their Job (the Job controller's
    `job-name` label)."""
    if LABEL_BRANCHJOB in labels:
        return ("BranchJob", labels[LABEL_BRANCHJOB])
    if "job-name" in labels:
        return ("Job", labels["job-name"])
    return None


def distillation_of(obj: Mapping[str, Any]) -> str | None:
    return labels_of(obj).get(LABEL_DISTILLATION)


# --------------------------------------------------------------------------- read-your-writes


@dataclass
class _Entry:
    at: float
    obj: Obj | None  # None: deleted by us
    uid: str | None
    rv: int | None
    owner: tuple[str, str] | None = None  # the controller (kind, name) of obj


class Overlay:
    """The operator's own recent writes, until the watch delivers them (or ``ttl`` passes)."""

    def __init__(self, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        #: (kind, namespace) -> name -> entry: a reconcile looks at one namespace's children.
        self._entries: dict[tuple[str, str], dict[str, _Entry]] = {}
        self._last_expiry = clock()

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def _put(self, kind: str, namespace: str, name: str, entry: _Entry) -> None:
        self._entries.setdefault((kind, namespace), {})[name] = entry
        if entry.at - self._last_expiry > self._ttl:
            self.expire()

    def wrote(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Record an object as returned by a create or patch."""
        m = meta(obj)
        self._put(kind, str(m.get("namespace")), str(m.get("name")),
                  _Entry(self._clock(), dict(obj), m.get("uid"), resource_version(obj), controller_of(obj)))  # fmt: skip

    def deleted(self, kind: str, namespace: str, name: str, uid: str | None) -> None:
        self._put(kind, namespace, name, _Entry(self._clock(), None, uid, None))

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self._entries.get((kind, namespace), {}).pop(name, None)

    def expire(self) -> None:
        now = self._clock()
        self._last_expiry = now
        for group_key, group in list(self._entries.items()):
            for name in [n for n, e in group.items() if now - e.at > self._ttl]:
                del group[name]
            if not group:
                del self._entries[group_key]

    def _resolve(self, kind: str, namespace: str, name: str, seen: Obj | None) -> Obj | None:
        group = self._entries.get((kind, namespace))
        entry = group.get(name) if group else None
        if entry is None or group is None:
            return seen
        if entry.obj is None:  # we deleted it
            if seen is None:
                del group[name]
                return None
            if entry.uid is not None and meta(seen).get("uid") != entry.uid:
                return seen  # a newer object under the same name
            if meta(seen).get("deletionTimestamp"):
                return seen
            shown = dict(seen)
            shown["metadata"] = {**meta(seen), "deletionTimestamp": "deleting"}
            return shown
        if seen is None:
            return entry.obj
        seen_rv, our_rv = resource_version(seen), entry.rv
        if meta(seen).get("uid") != entry.uid or seen_rv is None or our_rv is None or seen_rv >= our_rv:
            del group[name]  # the watch caught up (or the object was replaced)
            return seen
        return entry.obj

    def one(self, kind: str, namespace: str, name: str, seen: Obj | None) -> Obj | None:
        """The freshest of the watched copy and our last write of one object."""
        return self._resolve(kind, namespace, name, seen)

    def many(
        self, kind: str, namespace: str, seen: Iterable[Obj], belongs: Callable[[Obj], bool] | tuple[str, str]
    ) -> list[Obj]:
        """Watched children merged with ours: created-but-not-yet-watched ones added, deleted
        ones marked as deleting, patched ones at our version. ``belongs`` selects our writes
        that are children: a predicate, or the (kind, name) of their controller (cheaper: a
        burst leaves hundreds of entries in one namespace, and every reconcile scans them)."""
        out: dict[str, Obj] = {}
        for obj in seen:
            name = str(meta(obj).get("name"))
            resolved = self._resolve(kind, namespace, name, obj)
            if resolved is not None:
                out[name] = resolved
        group = self._entries.get((kind, namespace))
        if group:
            if isinstance(belongs, tuple):
                for name, entry in group.items():
                    if entry.owner == belongs and entry.obj is not None and name not in out:
                        out[name] = entry.obj
            else:
                for name, entry in group.items():
                    if name not in out and entry.obj is not None and belongs(entry.obj):
                        out[name] = entry.obj
        return [out[n] for n in sorted(out)]


# --------------------------------------------------------------------------- progress


def last_progress(log_tail: str) -> Progress | None:
    """The last well-formed ``BRANCHMERGE_PROGRESS {json}`` line of a log tail."""
    for line in reversed(log_tail.splitlines()):
        idx = line.find(PROGRESS_PREFIX)
        if idx < 0:
            continue
        try:
            return Progress.model_validate_json(line[idx + len(PROGRESS_PREFIX) :])
        except (ValidationError, ValueError):
            continue
    return None


@dataclass
class _ProgressEntry:
    read_at: float
    pod_uid: str | None
    progress: Progress | None


class ProgressCache:
    """Rank 0's progress per BranchJob, re-read from its log at most every ``interval`` s
    (a log read is one GET; a status write follows only when the numbers moved)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._entries: dict[Key, _ProgressEntry] = {}

    def due(self, key: Key, pod_uid: str | None) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.pod_uid != pod_uid:
            return True
        return self._clock() - entry.read_at >= self.interval

    def store(self, key: Key, pod_uid: str | None, progress: Progress | None) -> None:
        old = self._entries.get(key)
        if progress is None and old is not None and old.pod_uid == pod_uid:
            progress = old.progress  # an unreadable log keeps the last numbers
        self._entries[key] = _ProgressEntry(self._clock(), pod_uid, progress)

    def get(self, key: Key, pod_uid: str | None) -> Progress | None:
        entry = self._entries.get(key)
        return entry.progress if entry is not None and entry.pod_uid == pod_uid else None

    def drop(self, key: Key) -> None:
        self._entries.pop(key, None)


def rank0(pods: Iterable[Obj], attempt: int | None) -> Obj | None:
    """Rank 0 of the current attempt (the one that prints progress)."""
    for pod in pods:
        labels = labels_of(pod)
        if labels.get(LABEL_RANK) == "0" and (attempt is None or labels.get(LABEL_ATTEMPT) == str(attempt)):
            return pod
    return None


def job_pod_message(pods: Iterable[Obj], job_phase: str) -> str | None:
    """The termination message that describes a Job's outcome: the succeeded pod's result, or
    the newest failed pod's error."""
    wanted = "Succeeded" if job_phase == "Succeeded" else "Failed"
    candidates = [p for p in pods if (p.get("status") or {}).get("phase") == wanted]
    candidates.sort(key=lambda p: str(meta(p).get("creationTimestamp") or ""))
    for pod in reversed(candidates):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("message"):
                return str(term["message"])
    return None


def merge_patch_into(current: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (to tell whether a status patch would change anything).

    Dicts on the path are new; other values (lists, scalars) are shared with ``current`` and
    ``patch``, not copied — callers compare and read the result, and never mutate it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(current) if isinstance(current, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch_into(out.get(key), value)
    return out


# --------------------------------------------------------------------------- pruned fields

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_PRUNED_MESSAGES = ("unknown field", "credentials are not allowed")


def as_applied(body: Obj) -> Obj:
    """The object with the spec the user last applied, when the API server pruned part of it.

    A structural CRD schema cannot reject unknown fields: the server drops them, so a typo
    (`backofLimit`) silently becomes a default and a key typed into the spec silently
    vanishes. kubectl keeps what the user applied in an annotation; when that version has
    unknown fields, the planner is given it, and reports them in a Stalled condition (the fix
    is to correct the manifest and apply it again). Otherwise the body is returned as is.
    """
    text = (meta(body).get("annotations") or {}).get(LAST_APPLIED)
    if not text:
        return body
    try:
        applied = json.loads(text)
    except ValueError:
        return body
    if not isinstance(applied, dict) or applied.get("kind") != body.get("kind") or "spec" not in applied:
        return body
    candidate = {**{k: v for k, v in body.items() if k != "status"}, "spec": applied["spec"]}
    parsed, report = check_manifest(candidate)
    if parsed is not None or not any(m in i.message for i in report.issues for m in _PRUNED_MESSAGES):
        return body
    return {**candidate, "status": body.get("status")} if "status" in body else candidate


# --------------------------------------------------------------------------- status essence

#: Status fields a reconcile decides on (phases, counters, identities, outputs, scores, which
#: conditions hold). Everything else — messages, reasons, progress numbers, transition times —
#: is narrative: it may be written a moment later without changing any decision.
_ESSENTIAL = frozenset({
    "phase", "observedGeneration", "attempt", "restarts", "disruptions", "fingerprint", "outputUri",
    "checkpointUri", "startTime", "completionTime", "mergedModel", "branchesSucceeded", "headline",
    "results", "jobName", "name", "branchJob", "type", "status",
    "conditions", "branches", "merge", "evaluation",
})  # fmt: skip


def essence(value: Any) -> Any:
    """The decision-relevant projection of a status (see _ESSENTIAL)."""
    if isinstance(value, dict):
        return {k: essence(v) for k, v in value.items() if k in _ESSENTIAL}
    if isinstance(value, list):
        return [essence(v) for v in value]
    return value

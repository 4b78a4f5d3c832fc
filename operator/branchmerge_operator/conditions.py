"""What the operator reports: status conditions, timestamps and events, the Kubernetes way.

Why a module: both planners set the same condition types, and the rules are easy to get
subtly wrong — `lastTransitionTime` changes only when `status` flips, every condition carries
the generation it describes, and the list is written whole (status patches are merge
patches, which replace lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .api import Condition, ConditionStatus

#: kstatus / `kubectl wait` read these; per-stage types follow in each planner.
READY = "Ready"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
RECONCILING = "Reconciling"
STALLED = "Stalled"
SUSPENDED = "Suspended"
# Distillation stages
BRANCHES_SUCCEEDED = "BranchesSucceeded"
MERGED = "Merged"
EVALUATED = "Evaluated"
# BranchJob
RUNNING = "Running"

DISTILLATION_TYPES = (READY, SUCCEEDED, FAILED, RECONCILING, STALLED, SUSPENDED, BRANCHES_SUCCEEDED, MERGED, EVALUATED)
BRANCHJOB_TYPES = (READY, SUCCEEDED, FAILED, RECONCILING, STALLED, SUSPENDED, RUNNING)


def rfc3339(when: datetime) -> str:
    """`2025-03-01T12:00:00Z` (Kubernetes' timestamp format, whole seconds, UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """Inverse of rfc3339 (also accepts fractional seconds and offsets); None stays None."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def seconds_since(text: str | None, now: datetime) -> float | None:
    then = parse_time(text)
    return None if then is None else (now - then).total_seconds()


class ConditionSet:
    """Edits a condition list: unchanged status keeps its lastTransitionTime."""

    def __init__(self, previous: list[Condition], now: datetime, generation: int, order: tuple[str, ...]) -> None:
        self._previous = {c.type: c for c in previous}
        self._now = rfc3339(now)
        self._generation = generation
        self._order = order
        self._current: dict[str, Condition] = {}

    def set(self, type_: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        old = self._previous.get(type_)
        since = old.last_transition_time if old is not None and old.status == status else self._now
        self._current[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            # Empty strings are left out: some API servers reject "" in custom resources.
            message=message[:1024] or None,
            last_transition_time=since,
            observed_generation=self._generation,
        )

    def keep_previous(self) -> None:
        """Carry over conditions this reconcile did not set (e.g. while stalled)."""
        for type_, cond in self._previous.items():
            self._current.setdefault(type_, cond)

    def get(self, type_: str) -> Condition | None:
        return self._current.get(type_)

    def result(self) -> list[Condition]:
        """Known types in a fixed order, then any others (from a newer operator) as they were."""
        ordered = [self._current[t] for t in self._order if t in self._current]
        ordered += [c for t, c in self._current.items() if t not in self._order]
        return ordered


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to emit on the planned object (kopf.event / kopf.warn)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str

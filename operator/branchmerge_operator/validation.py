"""Readable validation errors: `spec.merge.steps[1].base: message (fix: …)`.

Why: pydantic's errors name tuple locations and internal types; users of a manifest need the
field path as they wrote it and what to change. Cross-field checks in api.py raise
`spec_error(...)` so that they come out in the same form as schema errors.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from .naming import DNS_1035_LABEL, DNS_1123_LABEL, DNS_1123_SUBDOMAIN

#: Regular expressions users should not have to read: what they mean, in words.
PATTERN_HINTS = {
    DNS_1123_SUBDOMAIN: "a Kubernetes object name: lower-case letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
    DNS_1123_LABEL: "a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit",
    DNS_1035_LABEL: "a DNS label starting with a letter: lower-case letters, digits and '-'",
    r"^[a-z0-9][a-z0-9_.-]*$": "lower-case letters, digits, '_', '.' and '-', starting with a letter or digit",
}


class Issue(NamedTuple):
    """One problem: where (field path as written in the manifest), what, and how to fix it."""

    path: str
    message: str
    fix: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text


def spec_error(issues: list[Issue]) -> PydanticCustomError:
    """A pydantic error carrying several cross-field issues (paths relative to the model)."""
    summary = "; ".join(str(i) for i in issues)
    return PydanticCustomError("cross_field", "{summary}", {"summary": summary, "issues": list(issues)})


def join_path(*parts: str | int) -> str:
    """('spec', 'branches', 0, 'name') -> 'spec.branches[0].name'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            if part.startswith("["):
                out += part
            else:
                out += f".{part}" if out else part
    return out


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional so that the model or container type is visible."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that validated the object at `loc` (best effort; None if unknown)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        origin = get_origin(current)
        if isinstance(part, int):
            if origin in (list, tuple) and get_args(current):
                current = get_args(current)[0]
                continue
            return None
        if isinstance(current, type) and issubclass(current, BaseModel):
            found = None
            for name, info in current.model_fields.items():
                if part in (name, info.alias):
                    found = info.annotation
                    break
            if found is None:
                return None
            current = found
        elif origin is dict and get_args(current):
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _allowed_fields(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: Any, root: type[BaseModel] | None) -> tuple[str, str | None]:
    """Message and fix for one standard pydantic error."""
    kind = err["type"]
    loc = tuple(err["loc"])
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1]) if root else None
        if parent is not None:
            allowed = _allowed_fields(parent)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return "unknown field", f"{hint}remove it or use one of: {', '.join(allowed)}"
        return "unknown field", "remove it; check the spelling against the documented fields"
    if kind == "missing":
        return "required field is missing", "add it"
    if kind == "literal_error":
        return f"{msg} (got {_short(given)})", None
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"{msg} (got {_short(given)})", "give a value of the documented type"
    if kind == "string_pattern_mismatch":
        pattern = (err.get("ctx") or {}).get("pattern", "")
        if pattern in PATTERN_HINTS:
            return f"{_short(given)} is not valid here", f"use {PATTERN_HINTS[pattern]}"
    if kind in ("string_pattern_mismatch", "string_too_long", "greater_than", "greater_than_equal",
                "less_than", "less_than_equal", "too_short", "too_long", "string_too_short"):
        return f"{msg} (got {_short(given)})", None
    return msg, None


@dataclass
class ValidationReport:
    """All problems of one manifest document, ready to print."""

    source: str = ""
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def add(self, path: str, message: str, fix: str | None = None) -> None:
        self.issues.append(Issue(path, message, fix))

    def extend_from(self, exc: ValidationError, root: type[BaseModel] | None = None, prefix: str = "") -> None:
        """Translate a pydantic error; `root` (the validated model) enables field suggestions."""
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            base = join_path(prefix, *loc)
            ctx = err.get("ctx") or {}
            if err["type"] == "cross_field" and "issues" in ctx:
                for issue in ctx["issues"]:
                    self.issues.append(Issue(join_path(base, issue.path), issue.message, issue.fix))
                continue
            message, fix = _describe(err, root)
            path = base
            # Validators in stages.py prefix their own field name ("uri: ..."); drop the echo.
            head, sep, rest = message.partition(": ")
            if sep and loc and head == str(loc[-1]):
                message = rest
            # reject_inline_secrets names the full path itself ("spec.output.secretKey: ...").
            if sep and head.startswith(("spec.", "spec[")):
                path, message = head, rest
            if " (fix: " not in message and fix is None and "; " in message:
                message, _, fix = message.partition("; ")
            self.issues.append(Issue(path, message, fix))

    @classmethod
    def from_error(
        cls, exc: ValidationError, root: type[BaseModel] | None = None, source: str = "", prefix: str = ""
    ) -> ValidationReport:
        report = cls(source=source)
        report.extend_from(exc, root, prefix)
        return report

    def lines(self) -> list[str]:
        return [str(i) for i in self.issues]

    def __str__(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if self.ok:
            return f"{head}valid"
        return head + f"{len(self.issues)} problem(s)\n" + "\n".join(f"  {line}" for line in self.lines())


class ManifestError(ValueError):
    """A manifest that cannot be used; carries one report per invalid document."""

    def __init__(self, reports: list[ValidationReport]) -> None:
        self.reports = reports
        super().__init__("\n".join(str(r) for r in reports))

    @property
    def issues(self) -> list[Issue]:
        return [i for r in self.reports for i in r.issues]


def first_line(reports: list[ValidationReport], limit: int = 3) -> str:
    """A compact one-paragraph summary for a status condition message."""
    issues = [i for r in reports for i in r.issues]
    text = "; ".join(str(i) for i in issues[:limit])
    if len(issues) > limit:
        text += f"; and {len(issues) - limit} more"
    return text


__all__ = [
    "Issue",
    "ManifestError",
    "ValidationReport",
    "first_line",
    "join_path",
    "spec_error",
]

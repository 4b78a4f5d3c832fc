"""What every stage shares: config loading, the committed-output check, progress reports,
the result file, and turning exceptions into a compact, actionable `StageResult`.

A stage module exposes ``run(stage, ctx) -> StageResult``; this module does the rest, so a
stage re-run with the same fingerprint returns at once without duplicate work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .stages import (
    PROGRESS_PREFIX,
    EvalStage,
    MergeStage,
    Progress,
    Score,
    SFTStage,
    StageError,
    StageResult,
    parse_stage,
)
from .storage import NotCommittedError, Storage, StorageError, storage_for

log = logging.getLogger("branchmerge")

AnyStage = SFTStage | MergeStage | EvalStage


class StageInputError(ValueError):
    """Bad input data or config discovered by a stage (reported as reason InvalidInput)."""


class ProgressReporter:
    """Prints progress lines (and optionally appends them to a file) at most every
    ``min_interval`` seconds, plus the final one."""

    def __init__(self, path: Path | None = None, min_interval: float = 1.0) -> None:
        self.path = path
        self.min_interval = min_interval
        self._last = 0.0

    def report(self, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        line = PROGRESS_PREFIX + json.dumps(progress.dump(), separators=(",", ":"))
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")


@dataclass
class StageContext:
    storage: Storage
    workdir: Path
    reporter: ProgressReporter
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def cache_dir(self) -> Path:
        d = self.workdir / "cache"
        d.mkdir(parents=True, exist_ok=True)
        return d


def load_config(path: str) -> AnyStage:
    """Read a stage config from a JSON/YAML file, '-' (stdin) or 'env:NAME'."""
    if path.startswith("env:"):
        text = os.environ.get(path[4:], "")
        if not text:
            raise StageInputError(f"--config {path}: environment variable is empty or unset")
    elif path == "-":
        text = sys.stdin.read()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise StageInputError(f"--config {path}: expected a mapping, got {type(data).__name__}")
    return parse_stage(data)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StageInputError | ValueError):
        return "InvalidInput"
    if isinstance(exc, NotCommittedError):
        return "InputNotCommitted"
    if isinstance(exc, StorageError):
        return "StorageError"
    if isinstance(exc, MemoryError):
        return "OutOfMemory"
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted"
    return "InternalError"


def write_result(result: StageResult, path: str) -> None:
    """Write the result file (the pod's termination message) and print it.

    Under torchrun several processes share one container and so one termination log: local
    rank 0 writes it, and any rank that fails overwrites it, so a failure is never hidden
    behind another process's success."""
    text = result.to_json()
    print("BRANCHMERGE_RESULT " + text, flush=True)
    if os.environ.get("LOCAL_RANK", "0") != "0" and result.status != "Failed":
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:  # e.g. /dev/termination-log outside a pod
        log.warning("could not write result to %s: %s", path, e)


def cached_result(stage: AnyStage, storage: Storage) -> StageResult | None:
    """The result of an earlier successful run with the same fingerprint, if committed."""
    manifest = storage.committed(stage.output, stage.fingerprint)
    if manifest is None:
        return None
    scores = [Score.model_validate(s) for s in manifest.extra.get("scores", [])]
    return StageResult(
        kind=stage.kind,
        status="Succeeded",
        fingerprint=stage.fingerprint,
        output=stage.output,
        cached=True,
        metrics=manifest.metrics,
        scores=scores,
    )


def execute(stage: AnyStage, run: Callable[[Any, StageContext], StageResult], *, result_path: str | None = None) -> int:
    """Run one stage with the shared contract; returns the process exit code."""
    path = result_path or stage.result_path
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    workdir = Path(os.environ.get("BRANCHMERGE_WORKDIR") or tempfile.mkdtemp(prefix="branchmerge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    progress_file = os.environ.get("BRANCHMERGE_PROGRESS_FILE")
    ctx = StageContext(
        storage=storage_for(stage.output, stage.storage),
        workdir=workdir,
        reporter=ProgressReporter(Path(progress_file) if progress_file and rank == 0 else None),
        rank=rank,
        world_size=world,
    )
    try:
        cached = cached_result(stage, ctx.storage)
        if cached is not None:
            log.info("%s: committed output with fingerprint %s exists; nothing to do", stage.name, stage.fingerprint)
            write_result(cached, path)
            return 0
        result = run(stage, ctx)
    except BaseException as exc:  # report everything, including Ctrl-C, then exit non-zero
        log.exception("%s failed", stage.name)
        msg = str(exc) or exc.__class__.__name__
        write_result(
            StageResult(
                kind=stage.kind,
                status="Failed",
                fingerprint=stage.fingerprint,
                error=StageError(reason=_reason(exc), message=msg[:2000]),
            ),
            path,
        )
        if isinstance(exc, KeyboardInterrupt):
            return 130
        return 1
    write_result(result, path)
    return 0 if result.status == "Succeeded" else 1

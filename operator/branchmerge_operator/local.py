"""Local executor: run a Distillation's stages as subprocesses on this machine.

The same manifest a user would ``kubectl apply`` runs here with no cluster. The stages are
the planner's (``derive.stages_for``), so fingerprints and output paths are the operator's;
each runs as ``branchmerge-train <stage> --config FILE`` with the stage config the operator
would put in a pod. What differs is only *where* a stage runs — scaled down to this machine
with every change reported (``scale_stages``) — never *what* it computes: fingerprints are
taken before scaling, so outputs written here (to the manifest's S3 output, say) are the ones
the operator would reuse, and vice versa.

Layout: the pure decisions (scaling, dependencies, which stages run, which may start next)
are plain functions at the top, unit-tested without processes; ``LocalExecutor`` below only
starts, watches and stops processes and records what happened in ``<workdir>/state.json``
(``branchmerge status DIR`` reprints it).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field

from branchmerge_trainer.stages import (
    PROGRESS_PREFIX,
    EvalStage,
    MergeStage,
    Model,
    Progress,
    Score,
    SFTStage,
    StageError,
    StageResult,
)

from .api import Distillation, OutputSpec

Stage = SFTStage | MergeStage | EvalStage

#: ``branchmerge-train`` subcommand per stage kind.
SUBCOMMANDS = {"SFT": "sft", "Merge": "merge", "Eval": "eval"}

STATE_FILE = "state.json"
LOG_TAIL_LINES = 20


class PlanError(ValueError):
    """The run cannot start as asked (bad --only, missing inputs, --strict refusal…)."""


# =========================================================================== pure decisions


@dataclass(frozen=True)
class Machine:
    """What this machine offers the stages."""

    cpus: int
    gpus: int = 0
    vllm: bool = False
    deepspeed: bool = False

    def describe(self) -> str:
        return f"{self.gpus} GPU(s), {self.cpus} CPU cores" if self.gpus else f"CPU only, {self.cpus} cores"


@dataclass(frozen=True)
class Change:
    """One setting the local run changes because this machine cannot honour it."""

    stage: str
    setting: str
    old: str
    new: str
    why: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.setting} {self.old} → {self.new} ({self.why})"


def _local_world_size(requested: int, gpus: int, global_batch: int, micro: int) -> int:
    """Processes for one branch here: one on CPU; on GPUs the largest count ≤ both the
    request and the GPUs that still splits the global batch evenly."""
    if gpus <= 0:
        return 1
    for n in range(min(requested, gpus), 0, -1):
        if global_batch % (micro * n) == 0:
            return n
    return 1


def scale_stage(stage: Stage, machine: Machine) -> tuple[Stage, list[Change]]:
    """The stage as it can run on ``machine``, and what had to change. The fingerprint is
    kept: these settings decide where the work runs, not its result."""
    changes: list[Change] = []
    if isinstance(stage, SFTStage):
        dist, t = stage.distributed, stage.training
        world = _local_world_size(dist.world_size, machine.gpus, t.global_batch_size, t.micro_batch_size)
        update: dict[str, Any] = {}
        if (dist.nnodes, dist.nproc_per_node) != (1, world):
            where = f"{world} process{'es' if world > 1 else ''} on {'GPU' if machine.gpus else 'CPU'}"
            accumulation = t.global_batch_size // (t.micro_batch_size * world)
            changes.append(
                Change(
                    stage.name,
                    "resources",
                    f"{dist.nnodes} node(s) × {dist.nproc_per_node} GPU(s) ({dist.world_size} processes)",
                    where,
                    f"this machine: {machine.describe()}; global batch {t.global_batch_size} kept "
                    f"by accumulating {accumulation} micro-batch(es) of {t.micro_batch_size} per step",
                )
            )
            update["distributed"] = dist.model_copy(update={"nnodes": 1, "nproc_per_node": world})
        if t.zero_stage > 0 and (machine.gpus == 0 or (t.zero_stage >= 2 and not machine.deepspeed)):
            why = "DeepSpeed ZeRO needs CUDA GPUs" if machine.gpus == 0 else "DeepSpeed is not installed here"
            changes.append(
                Change(stage.name, "training.zeroStage", str(t.zero_stage), "0", f"{why}; same math, unsharded state")
            )
            update["training"] = t.model_copy(update={"zero_stage": 0})
        return (stage.model_copy(update=update) if update else stage), changes
    if isinstance(stage, MergeStage):
        if stage.device == "cuda" and machine.gpus == 0:
            changes.append(Change(stage.name, "device", "cuda", "cpu", "no CUDA GPU here"))
            return stage.model_copy(update={"device": "cpu"}), changes
        return stage, changes
    if stage.backend == "vllm" and not (machine.vllm and machine.gpus):
        why = "vLLM is not installed here" if not machine.vllm else "vLLM needs a GPU"
        changes.append(Change(stage.name, "backend", "vllm", "transformers", why))
        return stage.model_copy(update={"backend": "transformers"}), changes
    return stage, changes


def scale_stages(stages: Sequence[Stage], machine: Machine, *, strict: bool = False) -> tuple[list[Stage], list[Change]]:
    """Scale every stage to ``machine``; with ``strict`` any needed change is an error."""
    out: list[Stage] = []
    changes: list[Change] = []
    for s in stages:
        scaled, c = scale_stage(s, machine)
        out.append(scaled)
        changes.extend(c)
    if strict and changes:
        lines = "\n  ".join(str(c) for c in changes)
        raise PlanError(f"--strict: this manifest cannot run unchanged on this machine:\n  {lines}")
    return out, changes


def is_local_uri(uri: str) -> bool:
    return not uri.startswith("s3://")


def localize_output(dist: Distillation, workdir: Path, *, use_manifest_output: bool) -> tuple[Distillation, str | None]:
    """Point an S3 output at ``<workdir>/outputs`` unless asked to use the manifest's.

    Only the location changes, and locations are not part of fingerprints, so the stages
    (and a later run against the real output) keep their identities.
    """
    uri = dist.spec.output.uri
    if use_manifest_output or is_local_uri(uri):
        return dist, None
    local = f"file://{(workdir / 'outputs').resolve()}"
    spec = dist.spec.model_copy(update={"output": OutputSpec(uri=local)})
    note = (
        f"outputs go to {local} instead of {uri} "
        "(pass --use-manifest-output to write there, with S3 credentials from the environment)"
    )
    return dist.model_copy(update={"spec": spec}), note


def input_uris(stage: Stage) -> list[tuple[str, str]]:
    """``(what, uri)`` of everything a stage reads."""
    if isinstance(stage, SFTStage):
        return [("student model", stage.student.uri)] + [
            (f"dataset {i}" if len(stage.datasets) > 1 else "dataset", d.uri) for i, d in enumerate(stage.datasets)
        ]
    if isinstance(stage, MergeStage):
        return [(f"model {name!r}", ref.uri) for name, ref in stage.models.items()]
    return [(f"model {name!r}", ref.uri) for name, ref in stage.models.items()] + [
        (f"benchmark {b.name!r}", b.uri) for b in stage.benchmarks
    ]


def dependencies(stages: Sequence[Stage]) -> dict[str, list[str]]:
    """Stage name → names of the stages whose outputs it reads."""
    producer = {s.output.rstrip("/"): s.name for s in stages}
    return {
        s.name: sorted({producer[u.rstrip("/")] for _, u in input_uris(s) if u.rstrip("/") in producer})
        for s in stages
    }


def external_inputs(stage: Stage, stages: Sequence[Stage]) -> list[tuple[str, str]]:
    """The inputs of ``stage`` that no stage of the run produces (they must exist already)."""
    produced = {s.output.rstrip("/") for s in stages}
    return [(what, uri) for what, uri in input_uris(stage) if uri.rstrip("/") not in produced]


def stage_aliases(stage: Stage) -> set[str]:
    """Names a user may give ``--only``: the stage name, a branch's own name, its kind."""
    names = {stage.name, stage.kind.lower()}
    if isinstance(stage, SFTStage):
        names.add("branches")
        if stage.name.startswith("branch-"):
            names.add(stage.name[len("branch-") :])
    return names


def select(stages: Sequence[Stage], only: Sequence[str]) -> set[str] | None:
    """Resolve ``--only`` names to stage names (None: all stages)."""
    if not only:
        return None
    chosen: set[str] = set()
    for name in only:
        hits = {s.name for s in stages if name in stage_aliases(s)}
        if not hits:
            valid = ", ".join(s.name for s in stages)
            raise PlanError(f"--only {name}: no such stage; the stages are {valid} (or 'branches')")
        chosen |= hits
    return chosen


Action = Literal["run", "cached", "skip"]


def decide(stages: Sequence[Stage], committed: Mapping[str, bool], selected: set[str] | None) -> dict[str, Action]:
    """Which stages run: a committed output is reused; with ``--only``, unselected stages are
    skipped — but a selected stage whose input would be neither reused nor produced is an error."""
    actions: dict[str, Action] = {}
    for s in stages:
        if committed.get(s.name, False):
            actions[s.name] = "cached"
        elif selected is not None and s.name not in selected:
            actions[s.name] = "skip"
        else:
            actions[s.name] = "run"
    deps = dependencies(stages)
    for s in stages:
        if actions[s.name] != "run":
            continue
        missing = [d for d in deps[s.name] if actions[d] == "skip"]
        if missing:
            raise PlanError(
                f"{s.name} needs the output of {', '.join(missing)}, which is not committed yet; "
                f"add {' '.join(missing)} to --only (or drop --only)"
            )
    return actions


StageStateName = Literal["pending", "cached", "skipped", "running", "succeeded", "failed", "interrupted", "blocked"]
DONE_OK: frozenset[str] = frozenset({"cached", "succeeded"})
TERMINAL: frozenset[str] = frozenset({"cached", "skipped", "succeeded", "failed", "interrupted", "blocked"})


def startable(order: Sequence[str], states: Mapping[str, str], deps: Mapping[str, Sequence[str]], free: int) -> list[str]:
    """Pending stages whose inputs are all done, in plan order, at most ``free`` of them."""
    out: list[str] = []
    for name in order:
        if len(out) >= free:
            break
        if states[name] == "pending" and all(states[d] in DONE_OK for d in deps[name]):
            out.append(name)
    return out


def blocked_by(order: Sequence[str], states: Mapping[str, str], deps: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Pending stages that can no longer run, with the upstream stage that stopped them."""
    out: dict[str, str] = {}
    current = dict(states)
    for name in order:  # plan order is topological, so one pass propagates
        if current[name] != "pending":
            continue
        for d in deps[name]:
            if current[d] in {"failed", "interrupted", "blocked", "skipped"}:
                out[name] = d
                current[name] = "blocked"
                break
    return out


def threads_per_stage(cpus: int, parallel: int) -> int:
    """Share the cores between stages running side by side (torch uses all of them by default)."""
    return max(1, cpus // max(1, parallel))


# =========================================================================== run state


class StageRecord(Model):
    """One stage of a local run, as ``state.json`` records it."""

    name: str
    kind: Literal["SFT", "Merge", "Eval"]
    fingerprint: str
    output: str
    state: StageStateName = "pending"
    reason: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    progress: Progress | None = None
    result: StageResult | None = None
    config_path: str | None = None
    log_path: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    returncode: int | None = None


class RunRecord(Model):
    """A whole local run: what ``branchmerge status DIR`` reprints."""

    version: int = 1
    manifest: str
    distillation: str
    workdir: str
    output_uri: str
    student_uri: str
    status: Literal["planned", "running", "succeeded", "failed", "interrupted"] = "planned"
    pid: int | None = None
    parallel: int = 1
    machine: str = ""
    changes: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    stages: list[StageRecord] = Field(default_factory=list)

    def stage(self, name: str) -> StageRecord:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def scores(self) -> list[Score]:
        """The eval stage's scores (fresh or from its committed output)."""
        return [sc for s in self.stages if s.kind == "Eval" and s.result is not None for sc in s.result.scores]

    def merged_model(self) -> str | None:
        for s in self.stages:
            if s.kind == "Merge" and s.state in DONE_OK:
                return s.output
        return None

    def failures(self) -> list[StageRecord]:
        return [s for s in self.stages if s.state == "failed"]


def save_record(record: RunRecord, workdir: Path) -> None:
    """Write ``state.json`` atomically (a reader never sees half a file)."""
    path = workdir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.dump(), indent=1))
    os.replace(tmp, path)


def load_record(workdir: Path) -> RunRecord:
    path = workdir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run recorded here (run `branchmerge run FILE --workdir {workdir}`)")
    return RunRecord.model_validate_json(path.read_text())


def executor_alive(record: RunRecord) -> bool:
    """Whether the process that wrote a 'running' record still exists."""
    if record.pid is None:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# =========================================================================== I/O: this machine


def detect_machine() -> Machine:
    """CPUs available to this process, visible NVIDIA GPUs (without importing torch)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    gpus = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        gpus = 0
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
            gpus = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            gpus = 0
        if visible:
            gpus = min(gpus, len([v for v in visible.split(",") if v.strip()]))
    return Machine(
        cpus=cpus,
        gpus=gpus,
        vllm=importlib.util.find_spec("vllm") is not None,
        deepspeed=importlib.util.find_spec("deepspeed") is not None,
    )


def check_inputs(stages: Sequence[Stage], to_run: set[str]) -> list[str]:
    """Problems with the inputs that must exist before the run starts (student, datasets,
    benchmarks): one readable line each. Checked up front so a typo fails in a second."""
    from branchmerge_trainer.storage import StorageError, storage_for

    problems: list[str] = []
    seen: set[str] = set()
    for stage in stages:
        if stage.name not in to_run:
            continue
        for what, uri in external_inputs(stage, stages):
            if uri in seen:
                continue
            seen.add(uri)
            try:
                storage = storage_for(uri, stage.storage)
                local = storage.local_path(uri)
                if local is not None:
                    problem = _local_input_problem(what, local)
                else:
                    problem = None if storage.exists(uri) or storage.list(uri) else "not found"
            except (StorageError, OSError) as e:
                problem = f"cannot be read ({str(e).removeprefix(uri + ': ')})"
            if problem:
                problems.append(f"{stage.name}: {what} {uri}: {problem}")
    return problems


def _local_input_problem(what: str, path: Path) -> str | None:
    if not path.exists():
        return "not found"
    if what.startswith("student") or what.startswith("model"):
        if not (path / "config.json").is_file():
            return "not a Hugging Face model directory (no config.json)"
        return None
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        return "an empty directory"
    return None


def committed_outputs(stages: Sequence[Stage]) -> dict[str, StageResult]:
    """The stages whose committed output (same fingerprint) exists, with the result it records."""
    from branchmerge_trainer.runtime import cached_result
    from branchmerge_trainer.storage import storage_for

    out: dict[str, StageResult] = {}
    for s in stages:
        result = cached_result(s, storage_for(s.output, s.storage))
        if result is not None:
            out[s.name] = result
    return out


def trainer_command() -> list[str]:
    """How to start ``branchmerge-train``: ``$BRANCHMERGE_TRAIN_COMMAND``, else the script
    beside this Python (same virtual environment), else ``python -m``."""
    override = os.environ.get("BRANCHMERGE_TRAIN_COMMAND")
    if override:
        return shlex.split(override)
    script = Path(sys.executable).with_name("branchmerge-train")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "branchmerge_trainer.cli"]


def stage_command(stage: Stage, config: Path, result: Path, trainer: Sequence[str]) -> list[str]:
    """The command line of one stage; a multi-GPU branch goes through torchrun."""
    sub = SUBCOMMANDS[stage.kind]
    tail = [sub, "--config", str(config), "--result-path", str(result)]
    if isinstance(stage, SFTStage) and stage.distributed.nproc_per_node > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={stage.distributed.nproc_per_node}",
            "-m",
            "branchmerge_trainer.cli",
            *tail,
        ]
    return [*trainer, *tail]


# =========================================================================== I/O: processes


class StageProcess:
    """One running stage: a subprocess in its own process group (so Ctrl-C reaches it only
    through us, in order), its output copied to the log file and scanned for progress."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self.progress: Progress | None = None
        self.lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = log_path.open("a", buffering=1)
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        self.proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{log_path.parent.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            if line.startswith(PROGRESS_PREFIX):
                try:
                    p = Progress.model_validate_json(line[len(PROGRESS_PREFIX) :])
                except ValueError:
                    continue
                with self.lock:
                    self.progress = p

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def finish(self) -> int:
        """Wait for exit and for the log to be fully copied; returns the exit code."""
        code = self.proc.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return code


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _committed_result(stage: Stage) -> StageResult | None:
    from branchmerge_trainer.runtime import cached_result
    from branchmerge_trainer.storage import StorageError, storage_for

    try:
        return cached_result(stage, storage_for(stage.output, stage.storage))
    except (StorageError, OSError, ValueError):
        return None


def _result_from(result_path: Path, stage: Stage, code: int) -> StageResult:
    """What a finished stage reports. Its own result file, completed from its committed
    output when it succeeded (the manifest keeps every score, while the result is capped at
    a termination message's size); otherwise a result saying how it died."""
    written: StageResult | None = None
    problem = "wrote no result"
    try:
        written = StageResult.model_validate_json(result_path.read_text())
    except OSError:
        pass
    except ValueError as e:
        problem = f"wrote an unreadable result ({str(e).splitlines()[0]})"
    reported_success = written is not None and written.status == "Succeeded"
    if code == 0 or reported_success:
        # A stage that published its output is done, even if a late signal (Ctrl-C just
        # after it finished) changed its exit code.
        committed = _committed_result(stage)
        if committed is not None and (written is None or reported_success):
            base = written or committed
            return base.model_copy(
                update={"scores": committed.scores or base.scores, "scores_omitted": 0, "metrics": base.metrics or committed.metrics}
            )
        if written is None:
            message = f"exited with code 0 but {problem} and committed nothing at {stage.output}"
            return StageResult(kind=stage.kind, status="Failed", fingerprint=stage.fingerprint, error=StageError(reason="NoResult", message=message))
        if code != 0:
            message = f"exited with code {code} after reporting success, but nothing is committed at {stage.output}"
            return StageResult(kind=stage.kind, status="Failed", fingerprint=stage.fingerprint, error=StageError(reason="NoOutput", message=message))
    if written is not None:
        return written
    if code < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
            message = f"killed by {name} before writing a result (out of memory?)"
            return StageResult(kind=stage.kind, status="Failed", fingerprint=stage.fingerprint, error=StageError(reason="Killed", message=message))
    message = f"exited with code {code} and {problem}"
    return StageResult(kind=stage.kind, status="Failed", fingerprint=stage.fingerprint, error=StageError(reason="NoResult", message=message))


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One run per work directory at a time."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise PlanError(f"{workdir} is in use by another `branchmerge run`; wait for it or pick another --workdir") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so `kill` also stops the stages cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class StopPolicy:
    """How long stopped stages get: SIGINT (a stage reports 'Interrupted' and exits), then
    SIGTERM, then SIGKILL."""

    interrupt_grace: float = 30.0
    terminate_grace: float = 10.0


class LocalExecutor:
    """Runs the planned stages, at most ``parallel`` at a time, recording every change."""

    def __init__(
        self,
        stages: Sequence[Stage],
        record: RunRecord,
        workdir: Path,
        *,
        parallel: int = 1,
        cpus: int = 1,
        trainer: Sequence[str] | None = None,
        on_update: Callable[[RunRecord], None] | None = None,
        stop: StopPolicy | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.deps = dependencies(stages)
        self.record = record
        self.workdir = workdir
        self.parallel = max(1, parallel)
        self.cpus = cpus
        self.trainer = list(trainer) if trainer else trainer_command()
        self.on_update = on_update
        self.stop = stop or StopPolicy()
        self.poll_interval = poll_interval
        self.running: dict[str, tuple[StageProcess, Path]] = {}
        self._last_save = 0.0

    # ---------------------------------------------------------------- paths

    def stage_dir(self, name: str) -> Path:
        return self.workdir / "stages" / name

    def _write_config(self, stage: Stage) -> Path:
        d = self.stage_dir(stage.name)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "config.json"
        path.write_text(json.dumps(stage.dump(), indent=1))
        return path

    # ---------------------------------------------------------------- loop

    def _states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.record.stages}

    def _emit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_save >= 1.0:
            save_record(self.record, self.workdir)
            self._last_save = now
        if self.on_update is not None:
            self.on_update(self.record)

    def _start(self, name: str) -> None:
        stage = self.stages[name]
        rec = self.record.stage(name)
        config = self._write_config(stage)
        result = self.stage_dir(name) / "result.json"
        result.unlink(missing_ok=True)
        progress_file = self.stage_dir(name) / "progress.jsonl"
        scratch = self.workdir / "scratch" / name
        scratch.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            BRANCHMERGE_WORKDIR=str(scratch),
            BRANCHMERGE_PROGRESS_FILE=str(progress_file),
            PYTHONUNBUFFERED="1",
        )
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads_per_stage(self.cpus, self.parallel))
        command = stage_command(stage, config, result, self.trainer)
        log_path = self.stage_dir(name) / "log.txt"
        proc = StageProcess(command, env, log_path)
        self.running[name] = (proc, result)
        rec.state, rec.reason = "running", None
        rec.config_path, rec.log_path = str(config), str(log_path)
        rec.started_at, rec.finished_at, rec.returncode, rec.result = time.time(), None, None, None

    def _reap(self) -> None:
        for name, (proc, result_path) in list(self.running.items()):
            rec = self.record.stage(name)
            with proc.lock:
                if proc.progress is not None:
                    rec.progress = proc.progress
            if proc.poll() is None:
                continue
            code = proc.finish()
            del self.running[name]
            result = _result_from(result_path, self.stages[name], code)
            rec.result, rec.returncode, rec.finished_at = result, code, time.time()
            if result.status == "Succeeded":
                rec.state, rec.reason = "succeeded", "reused committed output" if result.cached else None
            elif result.error is not None and result.error.reason == "Interrupted":
                rec.state, rec.reason = "interrupted", "stopped by Ctrl-C"
            else:
                rec.state = "failed"
                err = result.error
                rec.reason = f"{err.reason}: {err.message}" if err else f"exit code {code}"
            self._emit(force=True)

    def _block(self) -> None:
        for name, upstream in blocked_by(self.order, self._states(), self.deps).items():
            rec = self.record.stage(name)
            rec.state, rec.reason = "blocked", f"{upstream} did not succeed"

    def run(self) -> RunRecord:
        """Run to completion (or first interruption); the record says how it went."""
        self.record.status, self.record.started_at, self.record.pid = "running", time.time(), os.getpid()
        self._emit(force=True)
        interrupted = False
        with sigterm_as_interrupt():
            try:
                while True:
                    self._reap()
                    self._block()
                    free = self.parallel - len(self.running)
                    for name in startable(self.order, self._states(), self.deps, free):
                        self._start(name)
                    if not self.running:
                        break
                    self._emit()
                    time.sleep(self.poll_interval)
            except KeyboardInterrupt:
                interrupted = True
                self._stop_all()
        for rec in self.record.stages:
            if rec.state == "pending":
                rec.state, rec.reason = ("interrupted", "not started") if interrupted else ("blocked", "not reached")
        self.record.finished_at = time.time()
        if interrupted:
            self.record.status = "interrupted"
        elif any(s.state in {"failed", "blocked"} for s in self.record.stages):
            self.record.status = "failed"
        else:
            self.record.status = "succeeded"
        self._emit(force=True)
        return self.record

    def _stop_all(self) -> None:
        """SIGINT every stage's process group, then escalate for those that do not exit."""
        for proc, _ in self.running.values():
            proc.signal(signal.SIGINT)
        for sig, grace in ((signal.SIGTERM, self.stop.interrupt_grace), (signal.SIGKILL, self.stop.terminate_grace)):
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for p, _ in self.running.values()):
                with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C does not abandon children
                    self._emit()
                    time.sleep(self.poll_interval)
            for proc, _ in self.running.values():
                if proc.poll() is None:
                    proc.signal(sig)
        while True:
            try:
                self._reap()
                break
            except KeyboardInterrupt:
                continue
        for rec in self.record.stages:
            if rec.state == "failed" and rec.returncode is not None and rec.returncode < 0:
                rec.state, rec.reason = "interrupted", "stopped by Ctrl-C"


# =========================================================================== planning a run


@dataclass
class LocalPlan:
    """Everything decided before the first process starts."""

    distillation: Distillation
    stages: list[Stage]
    actions: dict[str, Action]
    changes: list[Change]
    notes: list[str]
    cached: dict[str, StageResult]
    machine: Machine

    def input_problems(self) -> list[str]:
        """Inputs the stages that will run need but that do not exist (see check_inputs)."""
        return check_inputs(self.stages, {n for n, a in self.actions.items() if a == "run"})

    def commands(self, workdir: Path, trainer: Sequence[str]) -> dict[str, list[str]]:
        out = {}
        for s in self.stages:
            d = workdir / "stages" / s.name
            out[s.name] = stage_command(s, d / "config.json", d / "result.json", trainer)
        return out


def plan_local(
    dist: Distillation,
    workdir: Path,
    *,
    machine: Machine,
    only: Sequence[str] = (),
    strict: bool = False,
    use_manifest_output: bool = False,
    check: bool = True,
) -> LocalPlan:
    """Derive, localise and scale the stages, find committed outputs, decide what runs and
    check that every external input exists. Raises PlanError with every problem found."""
    from .derive import stages_for

    dist, note = localize_output(dist, workdir, use_manifest_output=use_manifest_output)
    stages, changes = scale_stages(stages_for(dist), machine, strict=strict)
    selected = select(stages, only)
    from branchmerge_trainer.storage import StorageError

    try:
        cached = committed_outputs(stages)
    except (StorageError, OSError) as e:
        raise PlanError(f"cannot read the output {dist.spec.output.uri}: {e}") from e
    actions = decide(stages, {name: True for name in cached}, selected)
    plan = LocalPlan(dist, stages, actions, changes, [note] if note else [], cached, machine)
    if check:
        problems = plan.input_problems()
        if problems:
            raise PlanError(missing_inputs_message(problems))
    return plan


def missing_inputs_message(problems: Sequence[str]) -> str:
    return "missing inputs (nothing was started):\n  " + "\n  ".join(problems)


def new_record(plan: LocalPlan, manifest: str, workdir: Path, parallel: int) -> RunRecord:
    deps = dependencies(plan.stages)
    stages = []
    for s in plan.stages:
        action = plan.actions[s.name]
        rec = StageRecord(name=s.name, kind=s.kind, fingerprint=s.fingerprint, output=s.output, depends_on=deps[s.name])
        if action == "cached":
            rec.state, rec.reason, rec.result = "cached", "committed output reused", plan.cached[s.name]
        elif action == "skip":
            rec.state, rec.reason = "skipped", "not selected by --only"
        stages.append(rec)
    return RunRecord(
        manifest=manifest,
        distillation=plan.distillation.name,
        workdir=str(workdir),
        output_uri=plan.distillation.spec.output.uri,
        student_uri=plan.distillation.spec.student.uri,
        parallel=parallel,
        machine=plan.machine.describe(),
        changes=[str(c) for c in plan.changes],
        notes=plan.notes,
        stages=stages,
    )

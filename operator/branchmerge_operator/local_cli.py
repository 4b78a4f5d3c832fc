"""`branchmerge run FILE` and `branchmerge status DIR`: a Distillation on this machine.

Exit codes: 0 every stage succeeded (or was reused); 1 a stage failed; 2 the run could not
start (bad manifest, missing input, --strict refusal, busy work directory); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from .cli import command
from .local import (
    LocalExecutor,
    LocalPlan,
    Machine,
    PlanError,
    RunRecord,
    detect_machine,
    executor_alive,
    load_record,
    missing_inputs_message,
    new_record,
    plan_local,
    trainer_command,
    workdir_lock,
)
from .localview import RunView, summary
from .validation import ManifestError

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_START, EXIT_INTERRUPTED = 0, 1, 2, 130


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a manifest with one Distillation (the one you would kubectl apply)")
    p.add_argument("--workdir", metavar="DIR", help="state, logs and (by default) outputs; default .branchmerge/<name>")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="run up to N branches at once (default 1)")
    p.add_argument("--only", nargs="+", default=[], metavar="STAGE", help="run only these stages (e.g. math merge eval)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, and the commands, then stop")
    p.add_argument("--strict", action="store_true", help="refuse to scale cluster-only settings down to this machine")
    p.add_argument(
        "--use-manifest-output",
        action="store_true",
        help="write to the manifest's s3:// output (credentials from AWS_* environment variables) instead of DIR/outputs",
    )
    p.add_argument("--name", help="which Distillation, when FILE holds several")


def _pick(file: str, name: str | None, err: Console) -> object | None:
    from .api import Distillation, load_manifests

    try:
        resources = load_manifests(file)
    except ManifestError as e:
        for report in e.reports:
            err.print(f"{report.source}: {len(report.issues)} problem(s)", highlight=False)
            for line in report.lines():
                err.print(f"  {line}", highlight=False)
        return None
    except (OSError, yaml.YAMLError) as e:
        err.print(f"{file}: cannot read: {e}", highlight=False)
        return None
    dists = [r for r in resources if isinstance(r, Distillation)]
    if name is not None:
        dists = [d for d in dists if d.name == name]
    if len(dists) != 1:
        names = ", ".join(d.name for d in dists) or "none"
        err.print(f"{file}: expected one Distillation{f' named {name}' if name else ''}, found {names}; use --name")
        return None
    return dists[0]


def _print_plan(console: Console, plan: LocalPlan, workdir: Path) -> None:
    table = Table(title=f"plan for {plan.distillation.name} (on {plan.machine.describe()})", title_justify="left")
    for col in ("stage", "action", "fingerprint", "output"):
        table.add_column(col)
    for s in plan.stages:
        table.add_row(s.name, plan.actions[s.name], s.fingerprint, s.output)
    console.print(table)
    commands = plan.commands(workdir, trainer_command())
    for s in plan.stages:
        if plan.actions[s.name] == "run":
            console.print(f"  $ {' '.join(commands[s.name])}", highlight=False, soft_wrap=True)


def run_local(
    file: str,
    *,
    workdir: Path | None = None,
    parallel: int = 1,
    only: Sequence[str] = (),
    dry_run: bool = False,
    strict: bool = False,
    use_manifest_output: bool = False,
    name: str | None = None,
    console: Console | None = None,
    machine: Machine | None = None,
    trainer: Sequence[str] | None = None,
) -> int:
    """The whole `branchmerge run`; returns the exit code."""
    from .api import Distillation

    console = console or Console()
    err = Console(stderr=True)
    dist = _pick(file, name, err)
    if not isinstance(dist, Distillation):
        return EXIT_CANNOT_START
    if parallel < 1:
        err.print("--parallel must be at least 1")
        return EXIT_CANNOT_START
    workdir = (workdir or Path(".branchmerge") / dist.name).resolve()
    machine = machine or detect_machine()
    try:
        plan = plan_local(
            dist, workdir, machine=machine, only=only, strict=strict, use_manifest_output=use_manifest_output, check=False
        )
    except PlanError as e:
        err.print(f"[bold red]cannot run:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_CANNOT_START
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for change in plan.changes:
        console.print(f"[yellow]scaled down:[/] {change}", highlight=False, soft_wrap=True)
    if dry_run:
        _print_plan(console, plan, workdir)
    problems = plan.input_problems()
    if problems:
        err.print(f"[bold red]cannot run:[/] {missing_inputs_message(problems)}", highlight=False, soft_wrap=True)
        return EXIT_CANNOT_START
    if dry_run:
        return EXIT_OK
    try:
        with workdir_lock(workdir):
            record = new_record(plan, str(Path(file).resolve()), workdir, parallel)
            with RunView(console) as view:
                executor = LocalExecutor(
                    plan.stages,
                    record,
                    workdir,
                    parallel=parallel,
                    cpus=machine.cpus,
                    trainer=trainer,
                    on_update=view.update,
                )
                record = executor.run()
    except PlanError as e:
        err.print(f"[bold red]cannot run:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_CANNOT_START
    console.print(summary(record), soft_wrap=True)
    return exit_code(record)


def exit_code(record: RunRecord) -> int:
    return {"succeeded": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(record.status, EXIT_FAILED)


@command("run", "run a Distillation on this machine: every stage as a local process, outputs reused by fingerprint", _configure_run)
def cmd_run(args: argparse.Namespace) -> int:
    return run_local(
        args.file,
        workdir=Path(args.workdir) if args.workdir else None,
        parallel=args.parallel,
        only=args.only,
        dry_run=args.dry_run,
        strict=args.strict,
        use_manifest_output=args.use_manifest_output,
        name=args.name,
    )


def _configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", metavar="DIR", help="the --workdir of a `branchmerge run` (or `demo`)")


@command("status", "reprint a local run's stages, scores and merged model from DIR/state.json", _configure_status)
def cmd_status(args: argparse.Namespace) -> int:
    console = Console()
    try:
        record = load_record(Path(args.workdir))
    except (FileNotFoundError, ValueError) as e:
        print(f"branchmerge status: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    console.print(summary(record), soft_wrap=True)
    if record.status == "running" and not executor_alive(record):
        console.print("[magenta]the run that wrote this state is no longer running; run it again to resume[/]")
        return EXIT_INTERRUPTED
    if record.status == "running":
        when = time.strftime("%H:%M:%S", time.localtime(record.started_at or 0))
        console.print(f"[yellow]still running (pid {record.pid}, started {when})[/]")
        return EXIT_OK
    return exit_code(record)

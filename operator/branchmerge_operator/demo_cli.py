"""`branchmerge demo`: the quick start — a whole Branch-Merge distillation on this machine.

Two steps, both visible: (1) ``python -m branchmerge_trainer.demo prepare`` generates three
verifiable synthetic domains with teacher trajectories and benchmarks, pre-trains a tiny
student and writes a Distillation manifest (a subprocess: this command never imports
torch); (2) `branchmerge run` executes that manifest like any other, then prints the table.
Everything is reused on a second call: the inputs by a settings stamp, the stages by their
fingerprints.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .cli import command
from .local import StageProcess, detect_machine, log_tail, sigterm_as_interrupt
from .local_cli import EXIT_CANNOT_START, EXIT_INTERRUPTED, EXIT_OK, run_local

DEFAULT_WORKDIR = Path("runs/demo")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"where everything goes (default {DEFAULT_WORKDIR})")
    p.add_argument("--parallel", type=int, default=None, metavar="N", help="branches at once (default: 2 on 2+ cores)")
    p.add_argument("--prepare-only", action="store_true", help="only build the data, student and manifest")
    p.add_argument("--profile", choices=["default", "tiny"], default="default", help="'tiny' is a seconds-long smoke run")
    p.add_argument("--force", action="store_true", help="rebuild the data and student even if they exist")


def prepare(workdir: Path, profile: str, console: Console, *, force: bool = False) -> int:
    """Run the trainer-side generator with a progress bar for the student's pre-training."""
    workdir.mkdir(parents=True, exist_ok=True)
    progress_file = workdir / "prepare.progress.jsonl"
    progress_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "branchmerge_trainer.demo", "prepare", "--workdir", str(workdir), "--profile", profile]
    if force:
        command.append("--force")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BRANCHMERGE_PROGRESS_FILE": str(progress_file)}
    log = workdir / "prepare.log"
    proc = StageProcess(command, env, log)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    try:
        with sigterm_as_interrupt(), Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("pre-training the student", total=None, loss="–")
            last_line = 0.0
            while proc.poll() is None:
                with proc.lock:
                    p = proc.progress
                if p is not None:
                    loss = f"{p.loss:.3f}" if p.loss is not None else "–"
                    bar.update(task, total=p.total_steps, completed=p.step, loss=loss)
                    if not console.is_terminal and time.monotonic() - last_line > 15:
                        last_line = time.monotonic()
                        console.print(f"  pre-training the student: step {p.step}/{p.total_steps} loss {loss}", highlight=False, soft_wrap=True)
                time.sleep(0.2)
    except KeyboardInterrupt:
        proc.signal(signal.SIGINT)
        proc.finish()
        return EXIT_INTERRUPTED
    code = proc.finish()
    if code != 0:
        console.print(f"[bold red]✗ preparing the demo failed[/] (exit code {code}); log: {log}", highlight=False, soft_wrap=True)
        for line in log_tail(log):
            console.print(f"  │ {line}", style="dim", highlight=False, soft_wrap=True)
        return code
    return EXIT_OK


@command("demo", "the quick start: generate a tiny 3-domain distillation and run it here (minutes on a CPU)", _configure)
def cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    workdir: Path = args.workdir.resolve()
    start = time.monotonic()
    console.print(
        "[bold]branchmerge demo[/]: three synthetic domains (math, code, science) → one specialist each "
        "→ Arcee Fusion in TinyR1's order → eval of student, specialists and merged model",
        highlight=False,
    )
    console.print(f"[dim]1/2 data, teacher trajectories, benchmarks and a pre-trained student → {workdir}[/]", highlight=False, soft_wrap=True)
    code = prepare(workdir, args.profile, console, force=args.force)
    if code != EXIT_OK:
        return code
    manifest = workdir / "distillation.yaml"
    if args.prepare_only:
        console.print(f"ready: [bold]branchmerge run {manifest} --workdir {workdir}[/]", highlight=False, soft_wrap=True)
        return EXIT_OK
    machine = detect_machine()
    parallel = args.parallel or (2 if machine.cpus >= 2 else 1)
    if not manifest.exists():
        console.print(f"[bold red]{manifest} is missing[/]; rerun with --force")
        return EXIT_CANNOT_START
    console.print(f"[dim]2/2 branchmerge run {manifest} --workdir {workdir} --parallel {parallel}[/]", highlight=False, soft_wrap=True)
    code = run_local(str(manifest), workdir=workdir, parallel=parallel, console=console, machine=machine)
    elapsed = time.monotonic() - start
    console.print(f"demo finished in {elapsed / 60:.1f} min (exit code {code})", highlight=False, soft_wrap=True)
    return code

"""`branchmerge`: the control-plane command line.

Subcommands live in a registry so that adding one is a small, local change: write a
`configure(parser)` and a `run(args) -> exit code` function and decorate the latter with
`@command(name, help, configure)` (in this module, or in a module listed in
`COMMAND_MODULES`, imported lazily so that `branchmerge validate` never pays for kopf or
the Kubernetes client).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .naming import GROUP
from .validation import ManifestError

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Configure
    run: Run


COMMANDS: dict[str, Command] = {}

#: Modules that register more subcommands when imported (e.g. `run`, `status`, `demo`,
#: `operator`); a missing module is skipped so a partial install still works.
COMMAND_MODULES: tuple[str, ...] = (
    "branchmerge_operator.operator_main",
    "branchmerge_operator.local_cli",
    "branchmerge_operator.demo_cli",
)


def command(name: str, help: str, configure: Configure) -> Callable[[Run], Run]:
    """Register a subcommand."""

    def register(run: Run) -> Run:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


# --------------------------------------------------------------------------- validate


def _configure_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="YAML manifests (multi-document allowed; '-' = stdin); objects of other API groups are skipped",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")


@command("validate", "check manifests: schema and cross-field rules, with the fix for each problem", _configure_validate)
def cmd_validate(args: argparse.Namespace) -> int:
    from .api import check_manifest, is_branchmerge, read_documents

    bad = 0
    for file in args.files:
        try:
            docs = read_documents(file)
        except (OSError, yaml.YAMLError) as e:
            print(f"{file}: cannot read: {e}", file=sys.stderr)
            bad += 1
            continue
        if not docs:
            print(f"{file}: no documents", file=sys.stderr)
            bad += 1
        for i, doc in enumerate(docs):
            where = file if len(docs) == 1 else f"{file} (document {i + 1})"
            if not is_branchmerge(doc):
                if not args.quiet:
                    print(f"{where}: {_label(doc)}: skipped (not a {GROUP} resource)")
                continue
            obj, report = check_manifest(doc, where)
            if obj is None:
                bad += 1
                label = _label(doc)
                print(f"{where}: {label}: {len(report.issues)} problem(s)", file=sys.stderr)
                for line in report.lines():
                    print(f"  {line}", file=sys.stderr)
            elif not args.quiet:
                print(f"{where}: {obj.kind}/{obj.metadata.name}: valid")
    return 1 if bad else 0


def _label(doc: object) -> str:
    if isinstance(doc, dict):
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        return f"{doc.get('kind', '?')}/{name or '?'}"
    return "?"


# --------------------------------------------------------------------------- crds


def _configure_crds(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        action="append",
        metavar="DIR",
        help="directory to write to (repeatable); default: manifests/crds and charts/branchmerge/crds",
    )
    p.add_argument("--stdout", action="store_true", help="print the CRDs as one multi-document YAML stream")
    p.add_argument("--check", action="store_true", help="exit 1 if the files in the output directories are stale")


@command("crds", "render the CustomResourceDefinitions from the API models", _configure_crds)
def cmd_crds(args: argparse.Namespace) -> int:
    from .crds import DEFAULT_OUT_DIRS, crds, render, stale_files, write_crds

    if args.stdout:
        sys.stdout.write("---\n".join(render(obj) for obj in crds().values()))
        return 0
    dirs = [Path(d) for d in (args.out or DEFAULT_OUT_DIRS)]
    if args.check:
        stale = [f for d in dirs for f in stale_files(d)]
        for f in stale:
            print(f"stale: {f} (run `branchmerge crds`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_crds(dirs):
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- plan


def _configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a manifest with Distillations and/or BranchJobs")
    p.add_argument("--json", action="store_true", help="print the full stage configs as JSON")


@command("plan", "show the stages a manifest runs, with fingerprints and output URIs", _configure_plan)
def cmd_plan(args: argparse.Namespace) -> int:
    from .api import Distillation, load_manifests
    from .derive import Stage, stage_for_branchjob, stages_for

    try:
        resources = load_manifests(args.file)
    except ManifestError as e:
        for report in e.reports:
            print(f"{report.source}: {len(report.issues)} problem(s)", file=sys.stderr)
            for line in report.lines():
                print(f"  {line}", file=sys.stderr)
        return 1
    except (OSError, yaml.YAMLError) as e:
        print(f"{args.file}: cannot read: {e}", file=sys.stderr)
        return 1
    planned: list[tuple[str, list[Stage]]] = []
    for res in resources:
        stages: list[Stage] = stages_for(res) if isinstance(res, Distillation) else [stage_for_branchjob(res)]
        planned.append((f"{res.kind}/{res.metadata.name}", stages))
    if args.json:
        out = [{"resource": name, "stages": [s.dump() for s in stages]} for name, stages in planned]
        print(json.dumps(out, indent=2))
        return 0
    for name, stages in planned:
        print(name)
        width = max(len(s.name) for s in stages)
        for s in stages:
            print(f"  {s.kind:<5} {s.name:<{width}}  {s.fingerprint}  {s.output}")
    return 0


# --------------------------------------------------------------------------- main


def _load_plugins() -> None:
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            continue


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="branchmerge", description="Branch-Merge distillation of LLMs on Kubernetes (and on one machine)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    # Run as `python -m branchmerge_operator.cli`, this file is `__main__`, while the command
    # modules register into `branchmerge_operator.cli`: dispatch through that one.
    from branchmerge_operator.cli import main as _main

    sys.exit(_main())

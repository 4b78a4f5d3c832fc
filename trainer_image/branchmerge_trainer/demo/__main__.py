"""``python -m branchmerge_trainer.demo prepare --workdir DIR``: build the demo's inputs.

Run by ``branchmerge demo`` as a subprocess so that the control-plane command never imports
torch; progress lines use the stage protocol, so the same live view shows them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..runtime import ProgressReporter
from .prepare import PROFILES, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m branchmerge_trainer.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="generate data, pre-train the student, write the manifest")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    progress_file = os.environ.get("BRANCHMERGE_PROGRESS_FILE")
    reporter = ProgressReporter(Path(progress_file) if progress_file else None, min_interval=0.5)
    stamp = prepare(
        args.workdir,
        PROFILES[args.profile],
        progress=lambda p: reporter.report(p, force=p.step == p.total_steps),
        force=args.force,
    )
    print("BRANCHMERGE_DEMO " + json.dumps({k: stamp[k] for k in ("seconds", "reused", "domains", "student")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``branchmerge-train sft|merge|eval --config FILE``: the one entry point of every workload pod."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from .runtime import StageInputError, execute, load_config

#: subcommand -> (stage kind, module with ``run(stage, ctx)``); imported lazily so that
#: ``--help`` and config errors do not pay for torch.
STAGES = {
    "sft": ("SFT", "branchmerge_trainer.sft.stage"),
    "merge": ("Merge", "branchmerge_trainer.merge.stage"),
    "eval": ("Eval", "branchmerge_trainer.evaluate.stage"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="branchmerge-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (kind, _) in STAGES.items():
        p = sub.add_parser(name, help=f"run a {kind} stage")
        p.add_argument("--config", required=True, help="stage config: FILE (JSON/YAML), '-' or env:NAME")
        p.add_argument("--result-path", default=None, help="override the config's resultPath")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind, module = STAGES[args.command]
    try:
        stage = load_config(args.config)
    except (OSError, StageInputError, ValueError) as e:
        print(f"branchmerge-train {args.command}: invalid config: {e}", file=sys.stderr)
        return 2
    if stage.kind != kind:
        print(
            f"branchmerge-train {args.command}: config is a {stage.kind} stage; "
            f"run `branchmerge-train {next(k for k, v in STAGES.items() if v[0] == stage.kind)}` instead",
            file=sys.stderr,
        )
        return 2
    run: Any = importlib.import_module(module).run
    code = execute(stage, run, result_path=args.result_path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written (outputs, result, termination message). Interpreter teardown
        # of torch.distributed's native threads can still abort a finished rank (SIGABRT:
        # "terminate called without an active exception"), failing a pod whose work is done;
        # leave without running native destructors.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

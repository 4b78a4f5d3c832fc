"""Reproduce TinyR1's Table 2 and merge-method ablation at CPU scale, with our own system.

Every model in the study comes from a Distillation manifest (written to
``examples/ablation/<profile>/``), planned by the operator's planner
(``derive.stages_for`` via ``local.plan_local``) and run stage by stage with
``branchmerge-train``, exactly as ``branchmerge run FILE`` would run it. Per seed of SFT:

* ``table2-seed<s>.yaml``   math, science, code specialists + one data-mixture branch
  (all three data sets, as many optimizer steps × global batch as the three specialists
  together), merged (Math & Science) & Code with Arcee Fusion (TinyR1's order); eval of
  the merged model, every branch and (first seed only) the student.
* ``order-mc-seed<s>.yaml``  the same branches, merged (Math & Code) & Science.
* ``ablation-<method>-seed<s>.yaml``  math + science merged with one method (Arcee Fusion,
  linear = model soup, TIES, DARE-linear, DARE-TIES, task arithmetic).

Branches are shared between manifests by fingerprint, so each is trained once. Every eval
scores all three domains with sampling (temperature 0.6, top-p 0.95, as the paper) under
several eval seeds. Compute is the process CPU time (user + system) of each stage process,
read with ``os.wait4``; a cached stage reports the CPU time recorded when it ran.

    python bench/reproduce_table2.py            # the full study (~1 h on 2 idle cores)
    python bench/reproduce_table2.py --small    # the CI-sized variant (minutes)
    python bench/reproduce_table2.py --plot     # also draw docs/reproduction/*.png

Outputs: ``docs/reproduction/<profile>.json`` (raw: every score, every stage's CPU time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer_image")]

from branchmerge_operator.api import Distillation  # noqa: E402
from branchmerge_operator.local import (  # noqa: E402
    Stage,
    committed_outputs,
    dependencies,
    detect_machine,
    plan_local,
    stage_command,
    trainer_command,
)
from branchmerge_trainer.demo.domains import Difficulty  # noqa: E402
from branchmerge_trainer.demo.prepare import BranchTraining, DemoConfig  # noqa: E402
from branchmerge_trainer.demo.prompts import CODE_TEMPLATE, MATH_TEMPLATE, MC_TEMPLATE  # noqa: E402
from branchmerge_trainer.demo.student import StudentConfig  # noqa: E402

DOMAINS = ("math", "code", "science")
BENCH_KIND = {"math": "math", "code": "code", "science": "multiple_choice"}
BENCH_PROMPT = {"math": MATH_TEMPLATE, "code": CODE_TEMPLATE, "science": MC_TEMPLATE}
#: TinyR1's per-domain schedule and packing (paper.md), kept at small scale.
DOMAIN_TRAINING = {
    "math": {"schedule": "constant", "packing": "packed"},
    "science": {"schedule": "cosine", "packing": "neat"},
    "code": {"schedule": "constant", "packing": "neat"},
    "mixture": {"schedule": "constant", "packing": "neat"},
}
#: Merge-method ablation on math + science. Arcee Fusion as TinyR1 (base science, fuse
#: math in); the task-vector methods use the student as the base with mergekit's usual
#: settings (weight 1 per task vector, density 0.5 for the sparsifying ones).
ABLATION: dict[str, dict[str, Any]] = {
    "arcee_fusion": {"base": "science", "other": "math"},
    "linear": {"models": [{"model": "math"}, {"model": "science"}]},
    "ties": {
        "base": "student",
        "models": [{"model": m, "parameters": {"density": 0.5}} for m in ("math", "science")],
    },
    "dare_linear": {
        "base": "student",
        "models": [{"model": m, "parameters": {"density": 0.5}} for m in ("math", "science")],
    },
    "dare_ties": {
        "base": "student",
        "models": [{"model": m, "parameters": {"density": 0.5}} for m in ("math", "science")],
    },
    "task_arithmetic": {"base": "student", "models": [{"model": "math"}, {"model": "science"}]},
}
ORDERS = {
    "(math & science) & code": [
        {"name": "math-science", "base": "science", "other": "math"},
        {"base": "code", "other": "previous"},
    ],
    "(math & code) & science": [
        {"name": "math-code", "base": "code", "other": "math"},
        {"base": "science", "other": "previous"},
    ],
}


@dataclass(frozen=True)
class Profile:
    """Everything that sizes the study."""

    name: str
    demo: DemoConfig
    steps_per_specialist: int
    sft_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    global_batch_size: int = 4
    learning_rate: float = 2e-3
    max_sequence_length: int = 256
    precision: str = "bf16"
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"math": 48, "code": 96, "science": 48})
    eval_batch_size: int = 64
    mixture: bool = True
    orders: tuple[str, ...] = tuple(ORDERS)
    ablation: tuple[str, ...] = tuple(ABLATION)


#: The student and data every full-study manifest shares: the demo's domains with a smaller
#: student than ``branchmerge demo`` (2 layers × 64 wide), sized to a shared 2-core machine.
_STUDY_DEMO = DemoConfig(
    n_train=400,
    n_bench=24,
    difficulty=Difficulty(),
    student=StudentConfig(
        hidden_size=64, num_layers=2, intermediate_size=192, steps=100, batch_size=8, vocab_size=512
    ),
    training=BranchTraining(),
    max_new_tokens={"math": 40, "code": 64, "science": 40},
)
FULL = Profile(
    name="full",
    demo=_STUDY_DEMO,
    steps_per_specialist=200,
    sft_seeds=(0, 1),
    eval_seeds=(0, 1),
    max_new_tokens={"math": 40, "code": 64, "science": 40},
)
#: The CI regression check: the full study's student and settings, but one SFT seed, one eval
#: seed and only the student, the three specialists and the TinyR1-order merge (5 stages).
SMALL = replace(
    FULL,
    name="small",
    sft_seeds=(0,),
    eval_seeds=(0,),
    mixture=False,
    orders=("(math & science) & code",),
    ablation=(),
)
#: For developing this script: seconds per stage, numbers meaningless.
TINY = Profile(
    name="tiny",
    demo=DemoConfig(
        n_train=48,
        n_bench=6,
        student=StudentConfig(
            hidden_size=32,
            num_layers=1,
            intermediate_size=64,
            steps=4,
            batch_size=4,
            seq_len=128,
            vocab_size=400,
        ),
        training=BranchTraining(epochs=1, checkpoint_interval=2, precision="fp32"),
        eval_batch_size=8,
        max_new_tokens={"math": 16, "code": 16, "science": 16},
    ),
    steps_per_specialist=2,
    sft_seeds=(0, 1),
    eval_seeds=(0, 1),
    max_new_tokens={"math": 16, "code": 16, "science": 16},
    precision="fp32",
    eval_batch_size=8,
)
PROFILES = {"full": FULL, "small": SMALL, "tiny": TINY}


# --------------------------------------------------------------------------- manifests


def _branch(name: str, datasets: list[str], p: Profile, seed: int, steps: int) -> dict[str, Any]:
    return {
        "name": name,
        "datasets": [{"uri": u} for u in datasets],
        "training": {
            "epochs": 1000,  # bounded by maxSteps: equal compute is set in steps, not epochs
            "maxSteps": steps,
            "globalBatchSize": p.global_batch_size,
            "microBatchSize": p.global_batch_size,
            "learningRate": p.learning_rate,
            "warmupRatio": 0.1,
            "maxSequenceLength": p.max_sequence_length,
            "gradientCheckpointing": False,
            "zeroStage": 0,
            "precision": p.precision,
            "checkpointInterval": steps,
            "seed": seed,
            **DOMAIN_TRAINING[name],
        },
        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": 1, "memory": "2Gi"},
    }


def _benchmarks(inputs: str, p: Profile) -> list[dict[str, Any]]:
    """One benchmark per (domain, eval seed): the eval seed only changes sampling."""
    out = []
    for seed in p.eval_seeds:
        for d in DOMAINS:
            out.append(
                {
                    "name": f"{d}-s{seed}",
                    "kind": BENCH_KIND[d],
                    "uri": f"{inputs}/data/{d}/bench.jsonl",
                    "prompt": BENCH_PROMPT[d],
                    "samples": 1,
                    "temperature": p.temperature,
                    "topP": p.top_p,
                    "maxNewTokens": p.max_new_tokens[d],
                    "seed": seed,
                }
            )
    return out


def _distillation(
    name: str,
    inputs: str,
    output_dir: Path,
    branches: list[dict[str, Any]],
    steps: list[dict[str, Any]],
    models: list[str],
    p: Profile,
    seed: int,
) -> dict[str, Any]:
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": {
            "student": {"uri": f"{inputs}/models/student"},
            "teacher": {"name": "procedural-teacher", "source": "branchmerge demo domains (seed 0)"},
            "output": {"uri": f"file://{output_dir.resolve()}"},
            "branches": branches,
            "merge": {"method": "arcee_fusion", "steps": steps, "dtype": "float32", "seed": seed},
            "eval": {
                "models": models,
                "batchSize": p.eval_batch_size,
                "backend": "transformers",
                "benchmarks": _benchmarks(inputs, p),
            },
        },
    }


def manifests(p: Profile, inputs_dir: Path, output_dir: Path) -> dict[str, dict[str, Any]]:
    """File name → Distillation, for every manifest of the study."""
    inputs = f"file://{inputs_dir.resolve()}"
    out: dict[str, dict[str, Any]] = {}
    for seed in p.sft_seeds:
        spec = [
            _branch(d, [f"{inputs}/data/{d}/train.jsonl"], p, seed, p.steps_per_specialist)
            for d in ("math", "science", "code")
        ]
        mixture = _branch(
            "mixture",
            [f"{inputs}/data/{d}/train.jsonl" for d in ("math", "science", "code")],
            p,
            seed,
            3 * p.steps_per_specialist,
        )
        main_models = ["merged", "branches"] + (["student"] if seed == p.sft_seeds[0] else [])
        main_branches = spec + ([mixture] if p.mixture else [])
        out[f"table2-seed{seed}.yaml"] = _distillation(
            f"table2-s{seed}",
            inputs,
            output_dir,
            main_branches,
            ORDERS["(math & science) & code"],
            main_models,
            p,
            seed,
        )
        if "(math & code) & science" in p.orders:
            out[f"order-mc-seed{seed}.yaml"] = _distillation(
                f"order-mc-s{seed}",
                inputs,
                output_dir,
                spec,
                ORDERS["(math & code) & science"],
                ["merged"],
                p,
                seed,
            )
        for method in p.ablation:
            dashed = method.replace("_", "-")
            step = {"name": dashed, "method": method, **ABLATION[method]}
            out[f"ablation-{dashed}-seed{seed}.yaml"] = _distillation(
                f"ablation-{dashed}-s{seed}", inputs, output_dir, spec, [step], ["merged"], p, seed
            )
    return out


#: Which model of which manifest is which row of the table.
def rows_of(file: str) -> dict[str, str]:
    """Eval model name → table row, for one manifest file."""
    if file.startswith("table2-"):
        return {
            "student": "student",
            "math": "math specialist",
            "science": "science specialist",
            "code": "code specialist",
            "mixture": "data mixture (same compute)",
            "merged": "merge (math & science) & code",
        }
    if file.startswith("order-mc-"):
        return {"merged": "merge (math & code) & science"}
    method = file[len("ablation-") :].rsplit("-seed", 1)[0].replace("-", "_")
    return {"merged": f"math + science: {method}"}


# --------------------------------------------------------------------------- running


@dataclass
class StageRun:
    """One stage of the study and what running it cost."""

    stage: Stage
    deps: list[str]
    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    result: dict[str, Any] | None = None
    cached: bool = False


def _cpu_of(usage: Any) -> float:
    return float(usage.ru_utime + usage.ru_stime)


class Runner:
    """Runs the stages of all manifests (deduplicated by output), ``parallel`` at a time,
    and keeps a ledger of each stage's CPU time so a rerun can report cached stages."""

    def __init__(self, workdir: Path, parallel: int, log: Any = print) -> None:
        self.workdir = workdir
        self.parallel = parallel
        self.log = log
        self.ledger_path = workdir / "ledger.json"
        self.ledger: dict[str, dict[str, Any]] = (
            json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}
        )
        self.lock = threading.Lock()

    def _save(self) -> None:
        tmp = self.ledger_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ledger, indent=1))
        tmp.replace(self.ledger_path)

    def _run_one(self, key: str, run: StageRun) -> None:
        stage = run.stage
        d = self.workdir / "stages" / f"{stage.name}-{stage.fingerprint[:12]}"
        d.mkdir(parents=True, exist_ok=True)
        config, result = d / "config.json", d / "result.json"
        config.write_text(stage.model_dump_json(by_alias=True, indent=1))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }
        env["BRANCHMERGE_WORKDIR"] = str(d / "scratch")
        start = time.monotonic()
        with (d / "log.txt").open("w") as logf:
            proc = subprocess.Popen(
                stage_command(stage, config, result, trainer_command()),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        run.wall_seconds = time.monotonic() - start
        run.cpu_seconds = _cpu_of(usage)
        if proc.returncode != 0:
            tail = (d / "log.txt").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(
                f"{stage.name} ({key}) failed with exit code {proc.returncode}:\n  " + "\n  ".join(tail)
            )
        # Scores are read back from the committed output's manifest (plan_all): result.json
        # is the termination message, cut at 4 KiB, and an eval of many models overflows it.
        with self.lock:
            self.ledger[key] = {
                "stage": stage.name,
                "cpu_seconds": run.cpu_seconds,
                "wall_seconds": run.wall_seconds,
            }
            self._save()
        self.log(
            f"  done {stage.name:<16} {key[-16:]}  cpu {run.cpu_seconds:7.1f}s  wall {run.wall_seconds:7.1f}s"
        )

    def run(self, runs: dict[str, StageRun]) -> None:
        """Run every stage not yet committed, respecting dependencies."""
        pending = {k for k, r in runs.items() if not r.cached}
        done = {k for k, r in runs.items() if r.cached}
        running: dict[str, threading.Thread] = {}
        errors: list[BaseException] = []

        def target(k: str) -> None:
            try:
                self._run_one(k, runs[k])
            except BaseException as e:
                errors.append(e)

        while pending or running:
            for k, t in list(running.items()):
                if not t.is_alive():
                    t.join()
                    del running[k]
                    done.add(k)
            if errors:
                for t in running.values():
                    t.join()
                raise errors[0]
            ready = [k for k in sorted(pending, key=_order) if all(dep in done for dep in runs[k].deps)]
            for k in ready[: max(0, self.parallel - len(running))]:
                pending.discard(k)
                self.log(f"  start {runs[k].stage.name:<15} {k[-16:]}")
                running[k] = threading.Thread(target=target, args=(k,), daemon=True)
                running[k].start()
            time.sleep(0.5)


def _order(key: str) -> tuple[int, str]:
    """SFT first (the mixture, the longest, early), then merges, then evals."""
    kind = 0 if "/branch" in key else 1 if "/merge/" in key else 2
    return (kind, "0" if "/mixture/" in key else key)


def plan_all(
    files: dict[str, Distillation], workdir: Path
) -> tuple[dict[str, StageRun], dict[str, dict[str, str]]]:
    """Plan every manifest; returns the unique stages (by output URI) and, per file, the
    output URI of each of its stages by kind ('eval', 'merge', 'branch-<name>')."""
    machine = detect_machine()
    runs: dict[str, StageRun] = {}
    per_file: dict[str, dict[str, str]] = {}
    for file, dist in files.items():
        plan = plan_local(dist, workdir, machine=machine, use_manifest_output=True, check=False)
        deps = dependencies(plan.stages)
        by_name = {s.name: s.output.rstrip("/") for s in plan.stages}
        per_file[file] = by_name
        for s in plan.stages:
            key = s.output.rstrip("/")
            if key not in runs:
                runs[key] = StageRun(stage=s, deps=[by_name[n] for n in deps[s.name]])
    for r in runs.values():
        done = committed_outputs([r.stage])  # one at a time: stage names repeat across manifests
        if done:
            r.cached = True
            r.result = done[r.stage.name].model_dump(mode="json")
    return runs, per_file


# --------------------------------------------------------------------------- the table


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def collect(
    p: Profile,
    runs: dict[str, StageRun],
    per_file: dict[str, dict[str, str]],
    ledger: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Raw scores per (row, domain, sft seed, eval seed) and the CPU seconds of each row."""

    def cpu(key: str) -> float | None:
        r = runs[key]
        return r.cpu_seconds if r.cpu_seconds is not None else ledger.get(key, {}).get("cpu_seconds")

    raw: list[dict[str, Any]] = []
    compute: dict[str, dict[str, list[float]]] = {}
    for file, stages in per_file.items():
        seed = int(file.rsplit("seed", 1)[1].split(".")[0])
        result = runs[stages["eval"]].result or {}
        names = rows_of(file)
        branch_cpu = {n[len("branch-") :]: cpu(u) for n, u in stages.items() if n.startswith("branch-")}
        merge_cpu = cpu(stages["merge"])
        merge_metrics = (runs[stages["merge"]].result or {}).get("metrics", {})
        fused = [v for k, v in merge_metrics.items() if k.startswith("fused_fraction.")]
        eval_cpu = cpu(stages["eval"])
        n_eval_models = len({s["model"] for s in result.get("scores", [])}) or 1
        for score in result.get("scores", []):
            domain, eval_seed = score["benchmark"].rsplit("-s", 1)
            row = names[score["model"]]
            raw.append(
                {
                    "row": row,
                    "domain": domain,
                    "sft_seed": seed,
                    "eval_seed": int(eval_seed),
                    "score": score["score"],
                    "samples": score["samples"],
                    "mean_response_tokens": score.get("mean_response_tokens"),
                    "manifest": file,
                }
            )
        for model, row in names.items():
            if model == "student":
                train = 0.0
            elif model == "merged":
                used = [
                    b for b in ("math", "science", "code") if b in _merge_inputs(runs[stages["merge"]].stage)
                ]
                train = sum(branch_cpu[b] or 0.0 for b in used) + (merge_cpu or 0.0)
            else:
                train = branch_cpu.get(model) or 0.0
            c = compute.setdefault(
                row, {"train_cpu_seconds": [], "merge_cpu_seconds": [], "eval_cpu_seconds_per_model": []}
            )
            if model == "student" and seed != p.sft_seeds[0]:
                continue
            c["train_cpu_seconds"].append(train)
            if model == "merged" and merge_cpu is not None:
                c["merge_cpu_seconds"].append(merge_cpu)
            if model == "merged" and fused:
                # Arcee Fusion: fraction of elements taken from the fused-in model, per step
                c.setdefault("fused_fraction_per_step", []).append(statistics.fmean(fused))
            if eval_cpu is not None:
                c["eval_cpu_seconds_per_model"].append(eval_cpu / n_eval_models)
    table: dict[str, dict[str, Any]] = {}
    for rec in raw:
        table.setdefault(rec["row"], {}).setdefault(rec["domain"], []).append(rec["score"])
    summary = {
        row: {
            **{d: _mean_std(v) for d, v in sorted(ds.items())},
            "compute": {k: (statistics.fmean(v) if v else None) for k, v in compute.get(row, {}).items()},
        }
        for row, ds in table.items()
    }
    return {"raw": raw, "summary": summary}


def _merge_inputs(stage: Stage) -> set[str]:
    return set(getattr(stage, "models", {}))


# --------------------------------------------------------------------------- main


def prepare_inputs(p: Profile, inputs_dir: Path) -> dict[str, Any]:
    """The demo's data and pre-trained student (reused when the settings match), timed."""
    from branchmerge_trainer.demo.prepare import prepare

    before = resource.getrusage(resource.RUSAGE_SELF)
    stamp = prepare(inputs_dir, p.demo)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = _cpu_of(after) - _cpu_of(before)
    ledger = inputs_dir / "student_cpu.json"
    if not stamp.get("reused"):
        ledger.write_text(json.dumps({"key": stamp["key"], "cpu_seconds": cpu}))
    recorded = json.loads(ledger.read_text()) if ledger.exists() else {}
    return {
        "key": stamp["key"],
        "pretrain_cpu_seconds": recorded.get("cpu_seconds"),
        "student": stamp.get("student"),
    }


def write_manifests(p: Profile, inputs_dir: Path, output_dir: Path, to: Path) -> dict[str, Distillation]:
    to.mkdir(parents=True, exist_ok=True)
    files: dict[str, Distillation] = {}
    header = (
        "# Generated by bench/reproduce_table2.py (profile {name}); rerun one piece with\n"
        "#   branchmerge run {path} --workdir runs/reproduction-{name}\n"
        "# after `python bench/reproduce_table2.py{flag} --prepare-only` built the inputs it names.\n"
    )
    for file, doc in manifests(p, inputs_dir, output_dir).items():
        path = to / file
        flag = "" if p.name == "full" else f" --{p.name}"
        path.write_text(
            header.format(
                name=p.name, path=path.relative_to(ROOT) if path.is_relative_to(ROOT) else path, flag=flag
            )
            + yaml.safe_dump(doc, sort_keys=False)
        )
        files[file] = Distillation.model_validate(doc)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the CI-sized variant (a few minutes)")
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="full (default), small (= --small) or tiny (smoke)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default runs/reproduction-<profile>")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "reproduction", help="where the JSON (and plots) go"
    )
    ap.add_argument("--manifests", type=Path, default=None, help="default examples/ablation/<profile>")
    ap.add_argument("--sft-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per specialist (mixture: 3×)")
    ap.add_argument("--parallel", type=int, default=2, help="stages at once")
    ap.add_argument("--prepare-only", action="store_true", help="build inputs and manifests, run nothing")
    ap.add_argument("--plot", action="store_true", help="draw PNGs with bench/plot_reproduction.py")
    args = ap.parse_args(argv)

    p = PROFILES[args.profile or ("small" if args.small else "full")]
    if args.sft_seeds:
        p = replace(p, sft_seeds=tuple(args.sft_seeds))
    if args.eval_seeds:
        p = replace(p, eval_seeds=tuple(args.eval_seeds))
    if args.steps:
        p = replace(p, steps_per_specialist=args.steps)
    workdir = (args.workdir or ROOT / "runs" / f"reproduction-{p.name}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    print(
        f"profile {p.name}: {p.steps_per_specialist} steps/specialist, sft seeds {p.sft_seeds}, eval seeds {p.eval_seeds}"
    )
    print(f"inputs → {workdir / 'inputs'} (load average {load0[0]:.1f})", flush=True)
    inputs = prepare_inputs(p, workdir / "inputs")
    files = write_manifests(
        p, workdir / "inputs", workdir / "outputs", args.manifests or ROOT / "examples" / "ablation" / p.name
    )
    if args.prepare_only:
        return 0
    runs, per_file = plan_all(files, workdir)
    todo = sum(not r.cached for r in runs.values())
    print(f"{len(files)} manifests, {len(runs)} distinct stages, {todo} to run", flush=True)
    runner = Runner(workdir, args.parallel)
    runner.run(runs)
    runs, per_file = plan_all(files, workdir)  # re-read every result from the committed outputs
    report = collect(p, runs, per_file, runner.ledger)
    wall = time.monotonic() - t0
    report["meta"] = {
        "profile": p.name,
        "settings": {k: v for k, v in asdict(p).items() if k != "demo"},
        "demo": asdict(p.demo),
        "inputs": inputs,
        "wall_seconds_this_invocation": round(wall, 1),
        "stage_cpu_seconds_total": round(
            sum(runner.ledger.get(k, {}).get("cpu_seconds", 0.0) for k in runs), 1
        ),
        "stage_wall_seconds_total": round(
            sum(runner.ledger.get(k, {}).get("wall_seconds", 0.0) for k in runs), 1
        ),
        "stages": len(runs),
        "stages_run_this_invocation": todo,
        "load_average_start": [round(x, 2) for x in load0],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "manifests": sorted(files),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{p.name}.json"
    report["meta"]["invocations"] = _invocations(out, report["meta"])
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"wrote {out} in {wall / 60:.1f} min")
    if args.plot:
        from plot_reproduction import plot  # type: ignore[import-not-found]

        for path in plot(out, args.out):
            print(f"wrote {path}")
    return 0


def _invocations(out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """This invocation appended to those recorded in an earlier results file of the same
    settings, so a rerun that only re-reads cached stages keeps the wall time of the runs."""
    keys = (
        "wall_seconds_this_invocation",
        "stages_run_this_invocation",
        "load_average_start",
        "load_average_end",
    )
    this = {k: meta.get(k) for k in keys}
    if not out.exists():
        return [this]
    old = json.loads(out.read_text()).get("meta", {})
    if old.get("settings") != json.loads(json.dumps(meta["settings"])):
        return [this]
    return [*old.get("invocations", [{k: old.get(k) for k in keys}]), this]


def print_table(report: dict[str, Any]) -> None:
    print(f"{'model':<34}" + "".join(f"{d:>16}" for d in DOMAINS) + f"{'train CPU-s':>13}")
    for row, s in report["summary"].items():
        cells = "".join(
            f"{s[d]['mean']:>9.3f} ±{s[d]['std']:.3f}" if d in s else f"{'–':>16}" for d in DOMAINS
        )
        train = s["compute"].get("train_cpu_seconds")
        print(
            f"{row:<34}{cells}{(f'{train:13.0f}' if train is not None and not math.isnan(train) else '–'):>13}"
        )


if __name__ == "__main__":
    sys.exit(main())

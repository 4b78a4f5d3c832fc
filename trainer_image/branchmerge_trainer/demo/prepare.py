"""Everything the built-in demo needs, generated offline into one directory.

``python -m branchmerge_trainer.demo prepare --workdir DIR`` writes::

    DIR/data/<domain>/train.jsonl    teacher trajectories (chat messages, <think> reasoning)
    DIR/data/<domain>/bench.jsonl    the domain's benchmark (eval stage formats)
    DIR/models/student/              the pre-trained tiny student (HF format)
    DIR/distillation.yaml            the Distillation: three branches → Arcee Fusion
                                     (TinyR1 order) → eval of student, specialists, merged
    DIR/prepare.json                 what was built, from which settings, in how long

The layout is ``examples/tiny-cpu.yaml``'s, so that example runs on the same files. A second
call with the same settings returns at once (the stamp records a hash of the settings).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..stages import Progress
from .domains import Difficulty, Domain, make_domains
from .prompts import CODE_TEMPLATE, MATH_TEMPLATE, MC_TEMPLATE
from .student import StudentConfig

STAMP = "prepare.json"
#: Bump when generated files change meaning, so old demo directories are rebuilt.
DEMO_VERSION = 1


@dataclass(frozen=True)
class BranchTraining:
    """The branches' SFT settings (the manifest's ``training``), sized for two CPU cores."""

    epochs: float = 3
    global_batch_size: int = 4
    micro_batch_size: int = 4
    learning_rate: float = 5e-4
    max_sequence_length: int = 256
    checkpoint_interval: int = 25
    precision: str = "bf16"
    #: epochs of the math branch when it differs (its data is the shortest, its skill the hardest)
    math_epochs: float | None = None


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    n_train: int = 800
    #: worked chats per domain in the student's pre-training (its own problems); None: 10% of n_train
    n_warmup: int | None = None
    n_bench: int = 40
    difficulty: Difficulty = field(default_factory=Difficulty)
    student: StudentConfig = field(default_factory=StudentConfig)
    training: BranchTraining = field(default_factory=BranchTraining)
    eval_batch_size: int = 64
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"math": 96, "code": 96, "science": 80})

    def key(self) -> str:
        blob = json.dumps({"v": DEMO_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: For tests: a few seconds of everything.
TINY = DemoConfig(
    n_train=48,
    n_warmup=4,
    n_bench=6,
    student=StudentConfig(hidden_size=32, num_layers=1, intermediate_size=64, steps=4, batch_size=4, seq_len=128, vocab_size=400),
    training=BranchTraining(epochs=1, global_batch_size=4, micro_batch_size=4, checkpoint_interval=2, precision="fp32"),
    eval_batch_size=8,
    max_new_tokens={"math": 16, "code": 16, "science": 16},
)

#: What `branchmerge demo` runs: tuned so that a 1M-parameter student starts weak but not
#: random and every specialist clearly beats it on its own domain, in minutes on 2 cores.
#: (The dataclass defaults stay as they were: bench/reproduce_table2.py builds its study on
#: them, and its recorded results must keep reproducing.)
QUICKSTART = DemoConfig(
    n_warmup=300,
    difficulty=Difficulty(science_reasoning="checks", math_fact_repeats=4),
    student=StudentConfig(steps=400),
    training=BranchTraining(learning_rate=3e-4, math_epochs=5),
)

PROFILES = {"default": QUICKSTART, "tiny": TINY}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


#: The paper's per-domain schedule and packing (TinyR1: math constant + packing, science
#: cosine + neat packing, code constant + neat packing); the rest is scaled to a tiny model.
_DOMAIN_TRAINING: dict[str, dict[str, Any]] = {
    "math": {"schedule": "constant", "packing": "packed"},
    "science": {"schedule": "cosine", "packing": "neat"},
    "code": {"schedule": "constant", "packing": "neat"},
}
_BENCH = {
    "math": ("math", MATH_TEMPLATE),
    "code": ("code", CODE_TEMPLATE),
    "science": ("multiple_choice", MC_TEMPLATE),
}


def manifest(root: Path, cfg: DemoConfig, name: str = "demo") -> dict[str, Any]:
    """The demo's Distillation: branches in TinyR1's order, merged as TinyR1 was."""
    uri = f"file://{root.resolve()}"
    t = cfg.training
    branches = []
    for domain in ("math", "science", "code"):
        branches.append(
            {
                "name": domain,
                "datasets": [{"uri": f"{uri}/data/{domain}/train.jsonl"}],
                "training": {
                    "epochs": t.math_epochs if domain == "math" and t.math_epochs is not None else t.epochs,
                    "globalBatchSize": t.global_batch_size,
                    "microBatchSize": t.micro_batch_size,
                    "learningRate": t.learning_rate,
                    "warmupRatio": 0.1,
                    "maxSequenceLength": t.max_sequence_length,
                    "gradientCheckpointing": False,
                    "zeroStage": 0,
                    "precision": t.precision,
                    "checkpointInterval": t.checkpoint_interval,
                    "seed": cfg.seed,
                    **_DOMAIN_TRAINING[domain],
                },
                "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": 1, "memory": "2Gi"},
            }
        )
    benchmarks = []
    for domain in ("math", "code", "science"):
        kind, template = _BENCH[domain]
        benchmarks.append(
            {
                "name": domain,
                "kind": kind,
                "uri": f"{uri}/data/{domain}/bench.jsonl",
                "prompt": template,
                "samples": 1,
                "temperature": 0,
                "maxNewTokens": cfg.max_new_tokens[domain],
                "seed": cfg.seed,
            }
        )
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": {
            "student": {"uri": f"{uri}/models/student"},
            "teacher": {
                "name": "procedural-teacher",
                "source": f"branchmerge demo: synthetic verifiable domains, seed {cfg.seed}",
            },
            "output": {"uri": f"{uri}/outputs"},
            "branches": branches,
            "merge": {
                "method": "arcee_fusion",
                "steps": [
                    {"name": "math-science", "base": "science", "other": "math"},
                    {"base": "code", "other": "previous"},
                ],
                "dtype": "float32",
            },
            "eval": {
                "models": ["merged", "student", "branches"],
                "batchSize": cfg.eval_batch_size,
                "backend": "transformers",
                "benchmarks": benchmarks,
            },
        },
    }


def write_data(root: Path, domains: list[Domain]) -> None:
    for d in domains:
        write_jsonl(root / "data" / d.name / "train.jsonl", d.train)
        write_jsonl(root / "data" / d.name / "bench.jsonl", d.bench)


def tokenizer_texts(domains: list[Domain]) -> list[str]:
    """Everything the student will read or write, so the tokenizer covers it."""
    texts = [t for d in domains for t in d.corpus]
    texts += [m["content"] for d in domains for r in d.train for m in r["messages"]]
    return texts


def prepare(root: Path, cfg: DemoConfig, *, progress: Any = None, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the demo's inputs under ``root``; returns the stamp."""
    stamp_path = root / STAMP
    key = cfg.key()
    if not force and stamp_path.exists():
        stamp: dict[str, Any] = json.loads(stamp_path.read_text())
        if stamp.get("key") == key and (root / "models" / "student" / "config.json").exists():
            stamp["reused"] = True
            return stamp
    from .student import build_student

    start = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    domains = make_domains(cfg.seed, cfg.n_train, cfg.n_bench, cfg.difficulty, cfg.n_warmup)
    write_data(root, domains)
    student_dir = root / "models" / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)

    def report(step: int, total: int, loss: float, tps: float) -> None:
        if progress is not None:
            elapsed = time.monotonic() - start
            eta = elapsed / step * (total - step) if step else None
            progress(Progress(step=step, total_steps=total, loss=round(loss, 4), tokens_per_second=round(tps), eta_seconds=eta))

    metrics = build_student(
        student_dir,
        tokenizer_texts(domains),
        [t for d in domains for t in d.corpus],
        [r["messages"] for d in domains for r in d.warmup],
        cfg.student,
        report,
    )
    (root / "distillation.yaml").write_text(
        "# Generated by `branchmerge demo`; run it again with `branchmerge run` on this file.\n"
        + yaml.safe_dump(manifest(root, cfg), sort_keys=False)
    )
    stamp = {
        "key": key,
        "seconds": round(time.monotonic() - start, 1),
        "student": metrics,
        "domains": {d.name: {"train": len(d.train), "bench": len(d.bench)} for d in domains},
        "config": asdict(cfg),
        "reused": False,
    }
    stamp_path.write_text(json.dumps(stamp, indent=1, default=str))
    return stamp

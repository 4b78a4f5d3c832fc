"""The demo's prepare step: its files, its manifest (valid, TinyR1-shaped, runnable), reuse by
settings stamp — and the control-plane commands that never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge_operator.api import Distillation, load_manifests
from branchmerge_operator.derive import pipeline_stages
from branchmerge_operator.local import Machine, scale_stages
from branchmerge_trainer.demo.prepare import TINY, DemoConfig, manifest, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("demo")
    return root, prepare(root, TINY)


def test_writes_data_student_and_manifest(prepared: tuple[Path, dict[str, object]]) -> None:
    root, stamp = prepared
    for domain in ("math", "code", "science"):
        assert len((root / "data" / domain / "train.jsonl").read_text().splitlines()) == TINY.n_train
        assert len((root / "data" / domain / "bench.jsonl").read_text().splitlines()) == TINY.n_bench
    student = root / "models" / "student"
    assert (student / "config.json").exists() and (student / "tokenizer.json").exists()
    assert json.loads((student / "config.json").read_text())["model_type"] == "qwen2"
    assert stamp["reused"] is False and (root / "prepare.json").exists()


def test_manifest_is_a_valid_tinyr1_shaped_distillation(prepared: tuple[Path, dict[str, object]]) -> None:
    root, _ = prepared
    (dist,) = load_manifests(root / "distillation.yaml")
    assert isinstance(dist, Distillation)
    stages = pipeline_stages(dist)
    assert list(stages.branches) == ["math", "science", "code"]
    step1, step2 = stages.merge.steps
    assert (step1.method, step1.base, [m.model for m in step1.models]) == ("arcee_fusion", "science", ["math"])
    assert (step2.base, [m.model for m in step2.models]) == ("code", ["math-science"])
    assert stages.eval is not None
    assert set(stages.eval.models) == {"merged", "student", "math", "science", "code"}
    assert [(b.name, b.kind) for b in stages.eval.benchmarks] == [
        ("math", "math"), ("code", "code"), ("science", "multiple_choice")
    ]
    # Runs on a two-core CPU exactly as written.
    assert scale_stages(stages.all(), Machine(cpus=2), strict=True)[1] == []


def test_second_prepare_reuses_and_changed_settings_rebuild(prepared: tuple[Path, dict[str, object]]) -> None:
    root, first = prepared
    again = prepare(root, TINY)
    assert again["reused"] is True and again["key"] == first["key"]
    assert DemoConfig(seed=1).key() != DemoConfig().key()


def test_data_is_the_same_wherever_it_is_generated(tmp_path: Path, prepared: tuple[Path, dict[str, object]]) -> None:
    from branchmerge_trainer.demo.domains import make_domains
    from branchmerge_trainer.demo.prepare import write_data

    root, _ = prepared
    write_data(tmp_path, make_domains(TINY.seed, TINY.n_train, TINY.n_bench, TINY.difficulty))
    for f in sorted((root / "data").rglob("*.jsonl")):
        assert (tmp_path / "data" / f.relative_to(root / "data")).read_bytes() == f.read_bytes()


def test_manifest_points_at_the_root(tmp_path: Path) -> None:
    doc = manifest(tmp_path, TINY)
    assert doc["spec"]["student"]["uri"] == f"file://{tmp_path.resolve()}/models/student"
    assert doc["spec"]["output"]["uri"] == f"file://{tmp_path.resolve()}/outputs"


def test_control_plane_commands_do_not_import_torch() -> None:
    code = (
        "import sys, branchmerge_operator.cli as c; c.build_parser(); "
        "assert {'run', 'status', 'demo'} <= set(c.COMMANDS), c.COMMANDS; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""The API models: examples, defaults, cross-field rules, readable reports."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from branchmerge_operator.api import (
    BranchJob,
    Distillation,
    check_manifest,
    load_manifests,
    merge_patch,
    parse_manifest,
)
from branchmerge_operator.naming import MAX_BRANCHJOB_NAME, MAX_DISTILLATION_NAME, branchjob_name, pod_name
from branchmerge_operator.validation import ManifestError, ValidationReport
from branchmerge_trainer.stages import reject_inline_secrets

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL: dict[str, Any] = {
    "apiVersion": "branchmerge.io/v1alpha1",
    "kind": "Distillation",
    "metadata": {"name": "d"},
    "spec": {
        "student": {"uri": "s3://models/student"},
        "output": {"uri": "s3://runs/d"},
        "branches": [
            {"name": "math", "datasets": [{"uri": "s3://data/math.jsonl"}]},
            {"name": "code", "datasets": [{"uri": "s3://data/code.jsonl"}]},
        ],
    },
}


def manifest(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(spec)
    return doc


def issues(doc: dict[str, Any]) -> list[str]:
    obj, report = check_manifest(doc)
    assert obj is None, "expected the manifest to be rejected"
    return report.lines()


def test_examples_are_valid() -> None:
    assert {p.name for p in EXAMPLES} >= {"tinyr1-32b.yaml", "tiny-cpu.yaml"}
    for path in EXAMPLES:
        for obj in load_manifests(path):
            assert isinstance(obj, Distillation | BranchJob)


def test_tinyr1_example_is_the_papers_setup() -> None:
    [dist] = load_manifests(ROOT / "examples/tinyr1-32b.yaml")
    assert isinstance(dist, Distillation)
    spec = dist.spec
    assert "DeepSeek-R1-Distill-Qwen-32B" in spec.student.uri and spec.student.uri.startswith("s3://")
    branches = {b.name: b for b in spec.branches}
    assert list(branches) == ["math", "science", "code"]
    expected = {
        "math": (5, 96, "constant", "packed"),
        "science": (5, 32, "cosine", "neat"),
        "code": (15, 96, "constant", "neat"),
    }
    for name, (epochs, batch, schedule, packing) in expected.items():
        t, r = branches[name].training, branches[name].resources
        assert (t.epochs, t.global_batch_size, t.schedule, t.packing) == (epochs, batch, schedule, packing)
        assert t.learning_rate == 1e-5 and t.max_sequence_length == 16384 and t.zero_stage == 3
        assert (r.nodes, r.gpus_per_node) == (4, 8)
    steps = spec.merge.steps
    assert spec.merge.method == "arcee_fusion"
    assert (steps[0].base, steps[0].other) == ("science", "math")
    assert (steps[1].base, steps[1].other) == ("code", "previous")
    assert spec.eval is not None
    assert [b.preset for b in spec.eval.benchmarks] == ["aime2024", "livecodebench", "gpqa_diamond"]
    assert spec.output.credentials_secret


def test_tiny_example_is_cpu_only_and_small() -> None:
    [dist] = load_manifests(ROOT / "examples/tiny-cpu.yaml")
    assert isinstance(dist, Distillation)
    assert dist.spec.output.uri.startswith("file://")
    for b in dist.spec.branches:
        assert (b.resources.nodes, b.resources.gpus_per_node) == (1, 0)
        assert b.training.max_sequence_length <= 512


def test_defaults_are_the_papers() -> None:
    dist = parse_manifest(MINIMAL)
    assert isinstance(dist, Distillation)
    t = dist.spec.branches[0].training
    assert (t.learning_rate, t.adam_betas, t.weight_decay, t.warmup_ratio, t.seed) == (1e-5, (0.9, 0.95), 0.01, 0.1, 42)
    assert dist.spec.merge.method == "arcee_fusion"
    assert dist.spec.run_policy.backoff_limit == 3
    assert dist.spec.run_policy.startup_deadline_seconds == 600
    assert dist.spec.image.image is None  # the operator's default applies (workloads.default_trainer_image)


def test_default_merge_folds_branches_in_tinyr1_order() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["branches"] = [
        {"name": n, "datasets": [{"uri": f"s3://data/{n}.jsonl"}]} for n in ("math", "science", "code")
    ]
    dist = parse_manifest(doc)
    assert isinstance(dist, Distillation)
    steps = dist.spec.merge.effective_steps([b.name for b in dist.spec.branches])
    assert [(s.base, s.other) for s in steps] == [("science", "math"), ("code", "previous")]


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ([{"base": "math", "other": "code"}, {"base": "previous", "other": "student"}], None),
        ([{"name": "ms", "base": "math", "other": "code"}, {"base": "student", "other": "ms"}], None),
        ([{"base": "math", "other": "code"}, {"base": "student", "other": "step1"}], None),
        ([{"base": "math", "other": "code"}, {"base": "step2", "other": "student"}], "spec.merge.steps[1].base"),
        ([{"name": "math", "base": "math", "other": "code"}], "spec.merge.steps[0].name"),
        ([{"name": "x", "base": "math", "other": "code"}, {"name": "x", "base": "x", "other": "student"}],
         "duplicate step name"),
        ([{"method": "linear", "models": [{"model": "math"}, {"model": "code"}]}], None),
        ([{"method": "linear", "models": [{"model": "math"}]}], "linear needs at least two models"),
        ([{"method": "ties", "models": [{"model": "math"}, {"model": "code"}]}], "ties needs a base model"),
        ([{"method": "model_stock", "base": "student", "models": [{"model": "math"}]}], "at least 2 other"),
        ([{"method": "slerp", "base": "math", "other": "code", "parameters": {"t": 0.5}}], None),
        ([{"base": "math", "other": "math"}], "a model appears twice"),
        ([{"base": "math"}], "needs 'other'"),
    ],
)
def test_merge_step_rules(steps: list[dict[str, Any]], needle: str | None) -> None:
    obj, report = check_manifest(manifest(merge={"steps": steps}))
    if needle is None:
        assert obj is not None, report.lines()
    else:
        assert obj is None
        assert any(needle in line for line in report.lines()), report.lines()


def test_several_problems_are_all_reported() -> None:
    doc = manifest(merge={"steps": [{"base": "nope", "other": "previous"}]})
    doc["spec"]["branches"][1]["name"] = "math"
    lines = issues(doc)
    assert any(line.startswith("spec.branches[1].name: duplicate") for line in lines)
    assert any(line.startswith("spec.merge.steps[0].base: 'nope'") for line in lines)
    assert any(line.startswith("spec.merge.steps[0].other: 'previous'") for line in lines)


def test_batch_divisibility_counts_cpu_pods_as_one_process() -> None:
    ok = manifest()
    ok["spec"]["branches"][0].update(training={"globalBatchSize": 6}, resources={"nodes": 3, "gpusPerNode": 0})
    assert check_manifest(ok)[0] is not None
    bad = copy.deepcopy(ok)
    bad["spec"]["branches"][0]["training"]["microBatchSize"] = 4
    [line] = issues(bad)
    assert line.startswith("spec.branches[0].training.globalBatchSize: 6 is not divisible")
    assert "microBatchSize 4 × data-parallel size 3 = 12" in line and "fix: use a multiple of 12" in line


def test_name_limits_keep_every_child_name_within_63() -> None:
    longest = "a" * MAX_DISTILLATION_NAME
    doc = copy.deepcopy(MINIMAL)
    doc["metadata"]["name"] = longest
    doc["spec"]["branches"][0]["name"] = "b" * 20
    dist = parse_manifest(doc)
    bj = branchjob_name(dist.metadata.name, "b" * 20)
    assert len(bj) <= MAX_BRANCHJOB_NAME
    assert len(pod_name(bj, 255)) <= 63


def test_quantities_accept_numbers_and_suffixes() -> None:
    doc = manifest()
    doc["spec"]["branches"][0]["resources"] = {"cpu": 4, "memory": "16Gi"}
    doc["spec"]["merge"] = {"resources": {"cpu": "500m", "memory": 1.5}}
    dist = parse_manifest(doc)
    assert isinstance(dist, Distillation)
    assert dist.spec.branches[0].resources.cpu == "4"
    assert dist.spec.merge.resources.cpu == "500m"


@pytest.mark.parametrize(
    "key", ["maxNewTokens", "tokenizerSource", "meanResponseTokens", "pullSecrets", "credentialsSecret"]
)
def test_inline_secret_check_spares_ordinary_words(key: str) -> None:
    reject_inline_secrets({key: 1})


@pytest.mark.parametrize(
    "key", ["secretAccessKey", "accessKeyId", "AWS_SECRET_ACCESS_KEY", "password", "sessionToken", "apiKey"]
)
def test_inline_secret_check_rejects_credentials(key: str) -> None:
    with pytest.raises(ValueError, match="credentials are not allowed"):
        reject_inline_secrets({"output": {key: "x"}})


def test_unknown_fields_suggest_the_closest_name() -> None:
    doc = manifest(runPolicy={"backofLimit": 2})
    [line] = issues(doc)
    assert line.startswith("spec.runPolicy.backofLimit: unknown field")
    assert "did you mean 'backoffLimit'" in line


def test_branchjob_standalone() -> None:
    doc = {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "BranchJob",
        "metadata": {"name": "solo"},
        "spec": {
            "student": {"uri": "/models/student"},
            "datasets": [{"uri": "/data/train.jsonl"}],
            "output": {"uri": "/runs"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
        },
    }
    bj = parse_manifest(doc)
    assert isinstance(bj, BranchJob)
    assert bj.stage_name == "solo"


def test_multi_document_files(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    bad = manifest()
    bad["metadata"]["name"] = "Bad"
    path.write_text(yaml.safe_dump_all([MINIMAL, bad]))
    with pytest.raises(ManifestError) as err:
        load_manifests(path)
    [report] = err.value.reports
    assert report.source.endswith("#2")
    path.write_text(yaml.safe_dump_all([MINIMAL, None, MINIMAL]))
    assert len(load_manifests(path)) == 2


def test_status_is_read_leniently() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["status"] = {"phase": "Running", "someFutureField": {"x": 1}, "conditions": []}
    dist = parse_manifest(doc)
    assert isinstance(dist, Distillation)
    assert dist.status is not None and dist.status.phase == "Running"


def test_merge_patch_nulls_cleared_fields_and_drops_nulls_in_lists() -> None:
    dist = parse_manifest(MINIMAL)
    patch = merge_patch(dist.spec.run_policy)
    assert patch["activeDeadlineSeconds"] is None
    patch = merge_patch(dist.spec)
    assert patch["branches"][0]["datasets"][0] == {"uri": "s3://data/math.jsonl", "format": "auto"}


def test_report_formatting() -> None:
    report = ValidationReport(source="f.yaml")
    report.add("spec.x", "is wrong", "make it right")
    assert str(report) == "f.yaml: 1 problem(s)\n  spec.x: is wrong (fix: make it right)"
    assert not report.ok
    assert str(ValidationReport(source="g")) == "g: valid"

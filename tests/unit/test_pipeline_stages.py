"""stages_for: deterministic fingerprints, change propagation, output URIs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from branchmerge_operator.api import BranchJob, Distillation, parse_manifest
from branchmerge_operator.derive import branchjob_for, pipeline_stages, stage_for_branchjob, stages_for
from branchmerge_trainer.stages import EvalStage, MergeStage, SFTStage, parse_stage

BASE: dict[str, Any] = {
    "apiVersion": "branchmerge.io/v1alpha1",
    "kind": "Distillation",
    "metadata": {"name": "tiny", "generation": 1},
    "spec": {
        "student": {"uri": "s3://models/student"},
        "output": {"uri": "s3://runs/tiny/", "endpoint": "http://minio:9000", "credentialsSecret": "s3"},
        "branches": [
            {"name": "math", "datasets": [{"uri": "s3://data/math.jsonl"}], "training": {"globalBatchSize": 8}},
            {"name": "science", "datasets": [{"uri": "s3://data/sci.jsonl"}], "training": {"globalBatchSize": 8}},
            {"name": "code", "datasets": [{"uri": "s3://data/code.jsonl"}], "training": {"globalBatchSize": 8}},
        ],
        "merge": {"steps": [{"name": "ms", "base": "science", "other": "math"}, {"base": "code", "other": "previous"}]},
        "eval": {
            "models": ["merged", "student", "branches"],
            "benchmarks": [{"name": "aime2024", "kind": "math", "preset": "aime2024", "uri": "s3://data/aime.jsonl"}],
        },
    },
}


def dist(mutate: Callable[[dict[str, Any]], Any] | None = None) -> Distillation:
    doc = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(doc)
    obj = parse_manifest(doc)
    assert isinstance(obj, Distillation)
    return obj


def fps(d: Distillation) -> dict[str, str]:
    return {s.name: s.fingerprint for s in stages_for(d)}


def test_stage_order_kinds_and_uris() -> None:
    stages = stages_for(dist())
    assert [s.name for s in stages] == ["branch-math", "branch-science", "branch-code", "merge", "eval"]
    math = stages[0]
    assert isinstance(math, SFTStage)
    assert math.output == f"s3://runs/tiny/branches/math/{math.fingerprint}/model"
    assert math.checkpoints == f"s3://runs/tiny/branches/math/{math.fingerprint}/checkpoints"
    assert math.storage.endpoint == "http://minio:9000"
    merge, evaluation = stages[3], stages[4]
    assert merge.output == f"s3://runs/tiny/merge/{merge.fingerprint}/model"
    assert evaluation.output == f"s3://runs/tiny/eval/{evaluation.fingerprint}/results"
    assert len({s.fingerprint for s in stages}) == 5


def test_configs_round_trip_through_json() -> None:
    for stage in stages_for(dist()):
        assert parse_stage(stage.dump()) == stage
        assert "s3" not in stage.storage.dump().get("credentialsSecret", "")


def test_fingerprints_are_deterministic() -> None:
    assert fps(dist()) == fps(dist())


def test_merge_resolves_previous_and_inputs() -> None:
    merge = pipeline_stages(dist()).merge
    assert isinstance(merge, MergeStage)
    assert [(s.name, s.base, [m.model for m in s.models]) for s in merge.steps] == [
        ("ms", "science", ["math"]),
        ("step2", "code", ["ms"]),
    ]
    branches = pipeline_stages(dist()).branches
    assert set(merge.models) == {"science", "math", "code"}
    assert merge.models["math"].uri == branches["math"].output
    assert merge.models["math"].revision == branches["math"].fingerprint
    assert merge.tokenizer_source == "science"
    assert all(s.method == "arcee_fusion" for s in merge.steps)


def test_eval_models_and_presets() -> None:
    evaluation = pipeline_stages(dist()).eval
    assert isinstance(evaluation, EvalStage)
    assert set(evaluation.models) == {"merged", "student", "math", "science", "code"}
    [bench] = evaluation.benchmarks
    assert (bench.samples, bench.temperature, bench.top_p, bench.max_new_tokens) == (16, 0.6, 0.95, 32768)
    explicit = pipeline_stages(dist(lambda d: d["spec"]["eval"]["benchmarks"][0].update(samples=2))).eval
    assert explicit is not None and explicit.benchmarks[0].samples == 2


def set_in(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[keys[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("change", "redone"),
    [
        # what computes -> that stage and everything downstream
        (set_in("spec.branches.0.training.learningRate", 2e-5), {"branch-math", "merge", "eval"}),
        (set_in("spec.branches.1.datasets", [{"uri": "s3://data/sci-v2.jsonl"}]), {"branch-science", "merge", "eval"}),
        (set_in("spec.branches.2.datasets.0.revision", "v2"), {"branch-code", "merge", "eval"}),
        (set_in("spec.student.revision", "r2"), {"branch-math", "branch-science", "branch-code", "merge", "eval"}),
        (set_in("spec.merge.dtype", "float32"), {"merge", "eval"}),
        (set_in("spec.merge.steps.1.base", "math"), {"merge", "eval"}),
        (set_in("spec.eval.benchmarks.0.samples", 4), {"eval"}),
        (set_in("spec.eval.models", ["merged"]), {"eval"}),
        # how it runs -> nothing
        (set_in("spec.branches.0.resources", {"nodes": 2, "gpusPerNode": 4, "cpu": 8}), set()),
        (set_in("spec.image.image", "registry.local/trainer:dev"), set()),
        (set_in("spec.merge.resources", {"gpus": 1, "memory": "100Gi"}), set()),
        (set_in("spec.eval.batchSize", 8), set()),
        (set_in("spec.runPolicy", {"backoffLimit": 9, "suspend": True}), set()),
        (set_in("spec.queueName", "gpu"), set()),
        (set_in("spec.output.credentialsSecret", "other"), set()),
        (set_in("spec.branches.0.training.epochs", 5), set()),  # explicit default == default
    ],
)
def test_only_changed_stages_get_new_fingerprints(change: Callable[[dict[str, Any]], None], redone: set[str]) -> None:
    before = fps(dist())
    after = fps(dist(change))
    assert {name for name in before if before[name] != after.get(name)} == redone


def test_output_root_moves_outputs_but_not_fingerprints() -> None:
    moved = dist(set_in("spec.output.uri", "s3://elsewhere/x"))
    assert fps(moved) == fps(dist())
    assert all(s.output.startswith("s3://elsewhere/x/") for s in stages_for(moved))


def test_default_merge_steps_and_student_input() -> None:
    def no_steps(doc: dict[str, Any]) -> None:
        doc["spec"]["merge"] = {}

    merge = pipeline_stages(dist(no_steps)).merge
    assert [(s.base, [m.model for m in s.models]) for s in merge.steps] == [("science", ["math"]), ("code", ["step1"])]

    def with_student(doc: dict[str, Any]) -> None:
        doc["spec"]["merge"] = {"method": "task_arithmetic", "steps": [
            {"base": "student", "models": [{"model": "math", "parameters": {"weight": 0.5}}, {"model": "code"}]}
        ]}

    merge = pipeline_stages(dist(with_student)).merge
    assert set(merge.models) == {"student", "math", "code"}
    assert merge.models["student"].uri == "s3://models/student"
    assert merge.steps[0].models[0].parameters == {"weight": 0.5}
    assert merge.tokenizer_source == "student"


def test_branchjob_derived_from_a_branch_computes_the_same_stage() -> None:
    d = dist()
    stages = pipeline_stages(d)
    for branch in d.spec.branches:
        bj = branchjob_for(d, branch, stages.branches[branch.name])
        assert isinstance(bj, BranchJob)
        reparsed = parse_manifest(bj.dump())
        assert isinstance(reparsed, BranchJob)
        assert stage_for_branchjob(reparsed) == stages.branches[branch.name]
        assert bj.metadata.name == f"tiny-{branch.name}"
        assert bj.metadata.labels["branchmerge.io/fingerprint"] == stages.branches[branch.name].fingerprint


def test_distributed_config_from_resources() -> None:
    d = dist(set_in("spec.branches.0.resources", {"nodes": 2, "gpusPerNode": 4}))
    math = pipeline_stages(d).branches["math"]
    assert (math.distributed.nnodes, math.distributed.nproc_per_node) == (2, 4)
    cpu = pipeline_stages(dist(set_in("spec.branches.0.resources", {"gpusPerNode": 0}))).branches["math"]
    assert cpu.distributed.nproc_per_node == 1


def test_without_eval() -> None:
    d = dist(lambda doc: doc["spec"].pop("eval"))
    assert [s.kind for s in stages_for(d)] == ["SFT", "SFT", "SFT", "Merge"]

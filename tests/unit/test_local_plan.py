"""The local executor's pure decisions: scaling to this machine, dependencies, --only,
which stages run, which may start, which are blocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from branchmerge_operator.api import Distillation, load_manifests
from branchmerge_operator.derive import stages_for
from branchmerge_operator.local import (
    Machine,
    PlanError,
    blocked_by,
    decide,
    dependencies,
    external_inputs,
    localize_output,
    scale_stage,
    scale_stages,
    select,
    stage_command,
    startable,
    threads_per_stage,
)
from branchmerge_trainer.stages import EvalStage, MergeStage, SFTStage

ROOT = Path(__file__).resolve().parents[2]
CPU = Machine(cpus=2)


def _dist(name: str = "tinyr1-32b.yaml") -> Distillation:
    (dist,) = [r for r in load_manifests(ROOT / "examples" / name) if isinstance(r, Distillation)]
    return dist


def test_tinyr1_on_cpu_scales_gangs_and_zero_and_says_exactly_what() -> None:
    stages, changes = scale_stages(stages_for(_dist()), CPU)
    sft = [s for s in stages if isinstance(s, SFTStage)]
    assert all(s.distributed.world_size == 1 and s.training.zero_stage == 0 for s in sft)
    text = [str(c) for c in changes]
    assert "branch-math: resources 4 node(s) × 8 GPU(s) (32 processes) → 1 process on CPU" in text[0]
    assert "global batch 96 kept by accumulating 96 micro-batch(es) of 1 per step" in text[0]
    assert any(t.startswith("branch-code: training.zeroStage 3 → 0 (DeepSpeed ZeRO needs CUDA GPUs") for t in text)
    assert len(changes) == 6  # three branches × (resources, ZeRO)


def test_scaling_keeps_fingerprints_and_outputs() -> None:
    original = stages_for(_dist())
    scaled, _ = scale_stages(original, CPU)
    assert [(s.name, s.fingerprint, s.output) for s in scaled] == [(s.name, s.fingerprint, s.output) for s in original]


def test_strict_refuses_with_every_change_listed() -> None:
    with pytest.raises(PlanError) as e:
        scale_stages(stages_for(_dist()), CPU, strict=True)
    assert "--strict" in str(e.value) and "branch-science: training.zeroStage 3 → 0" in str(e.value)


def test_tiny_cpu_example_needs_no_change() -> None:
    stages, changes = scale_stages(stages_for(_dist("tiny-cpu.yaml")), CPU, strict=True)
    assert changes == [] and len(stages) == 5


def test_gpu_machine_keeps_a_divisor_of_the_global_batch() -> None:
    (math, *_) = stages_for(_dist())
    assert isinstance(math, SFTStage)
    scaled, changes = scale_stage(math, Machine(cpus=16, gpus=5, deepspeed=True))
    assert isinstance(scaled, SFTStage)
    assert scaled.distributed.nproc_per_node == 4  # 96 % (1 × 5) != 0; 96 % 4 == 0
    assert scaled.training.zero_stage == 3  # DeepSpeed is there
    assert "→ 4 processes on GPU" in str(changes[0])
    cmd = stage_command(scaled, Path("/c.json"), Path("/r.json"), ["branchmerge-train"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]


def test_merge_device_and_eval_backend_fall_back() -> None:
    stages = stages_for(_dist())
    merge = next(s for s in stages if isinstance(s, MergeStage)).model_copy(update={"device": "cuda"})
    ev = next(s for s in stages if isinstance(s, EvalStage)).model_copy(update={"backend": "vllm"})
    m2, c1 = scale_stage(merge, CPU)
    e2, c2 = scale_stage(ev, CPU)
    assert isinstance(m2, MergeStage) and m2.device == "cpu"
    assert isinstance(e2, EvalStage) and e2.backend == "transformers"
    assert str(c1[0]) == "merge: device cuda → cpu (no CUDA GPU here)"
    assert "vLLM is not installed here" in str(c2[0])


def test_s3_output_goes_to_the_workdir_unless_asked(tmp_path: Path) -> None:
    dist = _dist()
    local, note = localize_output(dist, tmp_path, use_manifest_output=False)
    assert local.spec.output.uri == f"file://{tmp_path.resolve()}/outputs"
    assert note and "s3://branchmerge/tinyr1-32b" in note and "--use-manifest-output" in note
    # Locations are not part of fingerprints.
    assert [s.fingerprint for s in stages_for(local)] == [s.fingerprint for s in stages_for(dist)]
    same, none = localize_output(dist, tmp_path, use_manifest_output=True)
    assert same is dist and none is None
    tiny = _dist("tiny-cpu.yaml")
    assert localize_output(tiny, tmp_path, use_manifest_output=False) == (tiny, None)


def test_dependencies_follow_output_uris() -> None:
    deps = dependencies(stages_for(_dist()))
    assert deps["branch-math"] == []
    assert deps["merge"] == ["branch-code", "branch-math", "branch-science"]
    assert deps["eval"] == ["branch-code", "branch-math", "branch-science", "merge"]


def test_external_inputs_are_the_student_datasets_and_benchmarks() -> None:
    stages = stages_for(_dist())
    ev = next(s for s in stages if isinstance(s, EvalStage))
    whats = [w for w, _ in external_inputs(ev, stages)]
    assert "model 'student'" in whats and "model 'merged'" not in whats
    assert {w for w in whats if w.startswith("benchmark")} == {
        "benchmark 'aime2024'",
        "benchmark 'livecodebench'",
        "benchmark 'gpqa-diamond'",
    }


def test_only_accepts_branch_names_kinds_and_rejects_unknowns() -> None:
    stages = stages_for(_dist())
    assert select(stages, []) is None
    assert select(stages, ["math", "merge"]) == {"branch-math", "merge"}
    assert select(stages, ["branches"]) == {"branch-math", "branch-science", "branch-code"}
    with pytest.raises(PlanError, match="--only maths: no such stage; the stages are branch-math"):
        select(stages, ["maths"])


def test_decide_reuses_committed_and_refuses_unproducible_inputs() -> None:
    stages = stages_for(_dist())
    names = [s.name for s in stages]
    assert decide(stages, {}, None) == dict.fromkeys(names, "run")
    everything = dict.fromkeys(names, True)
    assert set(decide(stages, everything, None).values()) == {"cached"}
    # A changed branch: only it, the merge and the eval run.
    changed = {**everything, "branch-code": False, "merge": False, "eval": False}
    actions = decide(stages, changed, None)
    assert [n for n, a in actions.items() if a == "run"] == ["branch-code", "merge", "eval"]
    # --only merge with every branch committed is fine; without, it says what to add.
    assert decide(stages, {"branch-math": True, "branch-science": True, "branch-code": True}, {"merge"})["eval"] == "skip"
    with pytest.raises(PlanError, match="merge needs the output of branch-code, which is not committed yet"):
        decide(stages, {"branch-math": True, "branch-science": True}, {"merge"})


def test_startable_respects_parallelism_and_inputs() -> None:
    order = ["a", "b", "c", "m", "e"]
    deps = {"a": [], "b": [], "c": [], "m": ["a", "b", "c"], "e": ["m"]}
    states = dict.fromkeys(order, "pending")
    assert startable(order, states, deps, 2) == ["a", "b"]
    assert startable(order, states, deps, 0) == []
    states.update(a="succeeded", b="cached", c="running")
    assert startable(order, states, deps, 3) == []
    states["c"] = "succeeded"
    assert startable(order, states, deps, 3) == ["m"]


def test_a_failure_blocks_only_what_depends_on_it() -> None:
    order = ["a", "b", "m", "e"]
    deps = {"a": [], "b": [], "m": ["a", "b"], "e": ["m"]}
    states = {"a": "failed", "b": "running", "m": "pending", "e": "pending"}
    assert blocked_by(order, states, deps) == {"m": "a", "e": "m"}
    assert blocked_by(order, {**states, "a": "succeeded"}, deps) == {}


def test_threads_share_the_cores() -> None:
    assert threads_per_stage(2, 1) == 2
    assert threads_per_stage(2, 3) == 1
    assert threads_per_stage(16, 3) == 5


def test_manifest_example_round_trips_yaml() -> None:
    # The demo manifest writer relies on the API accepting plain YAML dumps of a spec.
    dist = _dist("tiny-cpu.yaml")
    again = Distillation.model_validate(yaml.safe_load(yaml.safe_dump(dist.dump())))
    assert [s.fingerprint for s in stages_for(again)] == [s.fingerprint for s in stages_for(dist)]


def test_results_table_orders_models_and_shows_gains() -> None:
    from rich.console import Console

    from branchmerge_operator.local import RunRecord, StageRecord
    from branchmerge_operator.localview import results_markdown, results_table, stage_table
    from branchmerge_trainer.stages import Score, StageResult

    scores = [
        Score(model=m, benchmark=b, score=v, samples=40)
        for m, b, v in [
            ("merged", "math", 0.5), ("student", "math", 0.25), ("math", "math", 0.75), ("code", "math", 0.2),
            ("merged", "code", 0.1), ("student", "code", 0.1), ("math", "code", 0.0), ("code", "code", 0.6),
        ]
    ]
    stages = [
        StageRecord(name="branch-math", kind="SFT", fingerprint="a", output="file:///o/a", state="cached"),
        StageRecord(name="branch-code", kind="SFT", fingerprint="b", output="file:///o/b", state="succeeded"),
        StageRecord(name="merge", kind="Merge", fingerprint="c", output="file:///o/m", state="succeeded"),
        StageRecord(
            name="eval", kind="Eval", fingerprint="d", output="file:///o/e", state="succeeded",
            result=StageResult(kind="Eval", status="Succeeded", fingerprint="d", scores=scores),
        ),
    ]
    record = RunRecord(manifest="m.yaml", distillation="d", workdir="/w", output_uri="file:///o", student_uri="file:///s",
                       stages=stages)
    assert results_markdown(record).splitlines() == [
        "| model | math | code |",
        "|---|---:|---:|",
        "| student | 25.0 | 10.0 |",
        "| math | 75.0 (+50.0) | 0.0 (-10.0) |",
        "| code | 20.0 (-5.0) | 60.0 (+50.0) |",
        "| merged | 50.0 (+25.0) | 10.0 (+0.0) |",
    ]
    console = Console(record=True, width=120)
    table = results_table(record)
    assert table is not None
    console.print(table)
    console.print(stage_table(record))
    text = console.export_text()
    assert "75.0 (+50.0)" in text and "branch-code" in text and record.merged_model() == "file:///o/m"

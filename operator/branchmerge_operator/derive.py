"""Stage configs and child objects derived from a spec: pure functions of the spec.

Why separate from the planners: the operator, the local executor and `branchmerge plan`
must derive the *same* stage configs (and so the same fingerprints and output URIs) from a
manifest, whatever they observe. Fingerprints hash a stage's semantic config and its inputs'
fingerprints — never resources, images or the output location — so only a change that
alters what a stage computes re-runs it (and everything downstream of it).

Settings equal to their defaults are left out of the hash, so adding a new knob with a
default in a later version does not re-run finished work. Changing a default's value is
therefore a semantic change: bump FINGERPRINT_VERSION with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from branchmerge_trainer.stages import (
    DatasetRef,
    DistributedConfig,
    EvalStage,
    MergeModelEntry,
    MergeStage,
    ModelRef,
    ResolvedMergeStep,
    SFTStage,
    TrainingConfig,
    fingerprint,
)

from .api import (
    BranchJob,
    BranchJobMeta,
    BranchJobSpec,
    BranchResources,
    BranchSpec,
    Distillation,
    OutputSpec,
    RunPolicy,
)
from .naming import (
    ANNOTATION_GENERATION,
    LABEL_BRANCH,
    LABEL_DISTILLATION,
    LABEL_FINGERPRINT,
    LABEL_STAGE,
    MANAGED_BY,
    branch_checkpoints,
    branch_output,
    branchjob_name,
    eval_output,
    merge_output,
)

FINGERPRINT_VERSION = 1

Stage = SFTStage | MergeStage | EvalStage


def _semantic(model: BaseModel) -> dict[str, Any]:
    """What a setting means, for hashing: wire names, non-default values only."""
    return model.model_dump(by_alias=True, mode="json", exclude_defaults=True)


def model_fingerprint(ref: ModelRef) -> str:
    """A model given by URI is identified by its URI and optional revision tag."""
    return fingerprint({"v": FINGERPRINT_VERSION, "uri": ref.uri, "revision": ref.revision})


def sft_stage(
    stage_name: str,
    student: ModelRef,
    datasets: list[DatasetRef],
    training: TrainingConfig,
    resources: BranchResources,
    output: OutputSpec,
) -> SFTStage:
    """One branch's training stage (shared by Distillation branches and standalone BranchJobs)."""
    fp = fingerprint(
        {
            "v": FINGERPRINT_VERSION,
            "kind": "SFT",
            "student": model_fingerprint(student),
            "datasets": [_semantic(d) for d in datasets],
            "training": _semantic(training),
        }
    )
    return SFTStage(
        name=f"branch-{stage_name}",
        fingerprint=fp,
        output=branch_output(output.uri, stage_name, fp),
        checkpoints=branch_checkpoints(output.uri, stage_name, fp),
        storage=output.storage(),
        student=student,
        datasets=list(datasets),
        training=training,
        distributed=DistributedConfig(nnodes=resources.nodes, nproc_per_node=max(resources.gpus_per_node, 1)),
    )


def stage_for_branchjob(bj: BranchJob) -> SFTStage:
    spec = bj.spec
    return sft_stage(bj.stage_name, spec.student, spec.datasets, spec.training, spec.resources, spec.output)


@dataclass(frozen=True)
class PipelineStages:
    """Every stage of one Distillation, in execution order."""

    branches: dict[str, SFTStage]
    merge: MergeStage
    eval: EvalStage | None

    def all(self) -> list[Stage]:
        out: list[Stage] = list(self.branches.values())
        out.append(self.merge)
        if self.eval is not None:
            out.append(self.eval)
        return out


def _merge_stage(dist: Distillation, branches: dict[str, SFTStage]) -> MergeStage:
    spec = dist.spec
    merge = spec.merge
    steps = merge.effective_steps(list(branches))
    student_fp = model_fingerprint(spec.student)
    resolved: list[ResolvedMergeStep] = []
    used: list[str] = []  # input models in first-use order
    names: list[str] = []

    def ref(name: str) -> str:
        name = names[-1] if name == "previous" else name
        if (name in branches or name == "student") and name not in used:
            used.append(name)
        return name

    for i, step in enumerate(steps):
        base = ref(step.base) if step.base is not None else None
        entries = [MergeModelEntry(model=ref(e.model), parameters=e.parameters) for e in step.model_entries()]
        name = step.name or f"step{i + 1}"
        resolved.append(
            ResolvedMergeStep(
                name=name, method=step.method or merge.method, base=base, models=entries, parameters=step.parameters
            )
        )
        names.append(name)
    models: dict[str, ModelRef] = {}
    inputs: dict[str, str] = {}
    for name in used:
        if name == "student":
            models[name] = spec.student
            inputs[name] = student_fp
        else:
            models[name] = ModelRef(uri=branches[name].output, revision=branches[name].fingerprint)
            inputs[name] = branches[name].fingerprint
    tokenizer = merge.tokenizer_source or used[0]
    fp = fingerprint(
        {
            "v": FINGERPRINT_VERSION,
            "kind": "Merge",
            "inputs": inputs,
            "steps": [_semantic(s) for s in resolved],
            "dtype": merge.dtype,
            "outDtype": merge.out_dtype,
            "seed": merge.seed,
            "tokenizer": tokenizer,
        }
    )
    return MergeStage(
        name="merge",
        fingerprint=fp,
        output=merge_output(spec.output.uri, fp),
        storage=spec.output.storage(),
        models=models,
        steps=resolved,
        dtype=merge.dtype,
        out_dtype=merge.out_dtype,
        tokenizer_source=tokenizer,
        seed=merge.seed,
        # Branch outputs are ours: refuse them unless committed. The student may be a plain HF dir.
        committed_models=sorted(n for n in models if n != "student"),
    )


def _eval_stage(dist: Distillation, branches: dict[str, SFTStage], merge: MergeStage) -> EvalStage | None:
    spec = dist.spec
    if spec.eval is None:
        return None
    models: dict[str, ModelRef] = {}
    inputs: dict[str, str] = {}
    for which in spec.eval.models:
        if which == "merged":
            models["merged"] = ModelRef(uri=merge.output, revision=merge.fingerprint)
            inputs["merged"] = merge.fingerprint
        elif which == "student":
            models["student"] = spec.student
            inputs["student"] = model_fingerprint(spec.student)
        else:
            for name, stage in branches.items():
                models[name] = ModelRef(uri=stage.output, revision=stage.fingerprint)
                inputs[name] = stage.fingerprint
    benchmarks = [b.with_preset() for b in spec.eval.benchmarks]
    fp = fingerprint(
        {
            "v": FINGERPRINT_VERSION,
            "kind": "Eval",
            "inputs": inputs,
            "benchmarks": [_semantic(b) for b in benchmarks],
            "backend": spec.eval.backend,
        }
    )
    return EvalStage(
        name="eval",
        fingerprint=fp,
        output=eval_output(spec.output.uri, fp),
        storage=spec.output.storage(),
        models=models,
        benchmarks=benchmarks,
        batch_size=spec.eval.batch_size,
        backend=spec.eval.backend,
    )


def pipeline_stages(dist: Distillation) -> PipelineStages:
    """All stage configs of a Distillation (deterministic; no I/O)."""
    spec = dist.spec
    branches = {
        b.name: sft_stage(b.name, spec.student, b.datasets, b.training, b.resources, spec.output) for b in spec.branches
    }
    merge = _merge_stage(dist, branches)
    return PipelineStages(branches=branches, merge=merge, eval=_eval_stage(dist, branches, merge))


def stages_for(dist: Distillation) -> list[Stage]:
    """SFT stages (branch order), the merge, then the eval if configured."""
    return pipeline_stages(dist).all()


def branchjob_for(dist: Distillation, branch: BranchSpec, stage: SFTStage) -> BranchJob:
    """The BranchJob a Distillation creates for one branch (ownerReferences are the caller's)."""
    spec = dist.spec
    policy = spec.run_policy
    return BranchJob(
        metadata=BranchJobMeta(
            name=branchjob_name(dist.name, branch.name),
            namespace=dist.metadata.namespace,
            labels={
                **MANAGED_BY,
                LABEL_DISTILLATION: dist.name,
                LABEL_BRANCH: branch.name,
                LABEL_STAGE: "branch",
                LABEL_FINGERPRINT: stage.fingerprint,
            },
            annotations={ANNOTATION_GENERATION: str(dist.generation)},
        ),
        spec=BranchJobSpec(
            stage_name=branch.name,
            student=spec.student,
            datasets=branch.datasets,
            training=branch.training,
            resources=branch.resources,
            image=spec.image,
            output=spec.output,
            # The pipeline owns the overall deadline and TTL; the gang owns its retries.
            run_policy=RunPolicy(
                backoff_limit=policy.backoff_limit,
                startup_deadline_seconds=policy.startup_deadline_seconds,
                suspend=policy.suspend,
            ),
            queue_name=spec.queue_name,
        ),
    )

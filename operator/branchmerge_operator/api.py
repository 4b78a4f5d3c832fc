"""The `Distillation` and `BranchJob` resources (group branchmerge.io, version v1alpha1).

This module is the one source of truth for the API: the CRDs are rendered from it
(`crds.py`), the planner reads it (`pipeline.py`) and `branchmerge validate` checks
manifests with it. Hyperparameters, dataset/model references and benchmark settings are the
stage contract's own models (`branchmerge_trainer.stages`), so each knob is defined once.

Validation happens twice: the CRD schema rejects what OpenAPI can express at `kubectl apply`
(types, enums, bounds, patterns), and the operator re-validates every object with these
models — cross-field rules and unknown fields (which the API server prunes silently) end up
in a `Stalled` condition with the same messages `branchmerge validate` prints.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from branchmerge_trainer.stages import (
    BENCHMARK_PRESETS,
    BenchmarkConfig,
    DatasetRef,
    Dtype,
    MergeMethod,
    MergeStepConfig,
    Model,
    ModelRef,
    Progress,
    Score,
    StorageConfig,
    TrainingConfig,
    check_uri,
    reject_inline_secrets,
)

from .naming import (
    API_VERSION,
    DNS_1035_LABEL,
    DNS_1123_LABEL,
    DNS_1123_SUBDOMAIN,
    GROUP,
    MAX_BRANCH_NAME,
    MAX_BRANCHJOB_NAME,
    MAX_DISTILLATION_NAME,
    MAX_NODES,
    MAX_STEP_NAME,
    RESERVED_NAMES,
)
from .validation import Issue, ManifestError, ValidationReport, spec_error

DEFAULT_IMAGE = "ghcr.io/branchmerge/trainer:0.1.0"

# --------------------------------------------------------------------------- field types

#: Kubernetes resource quantity (no sign: requests are never negative).
QUANTITY_PATTERN = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"


def _quantity(value: Any) -> str:
    """Accept `4`, `0.5`, `"500m"`, `"16Gi"`; reject negatives and typos with a hint."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a Kubernetes quantity like 4, 500m or 16Gi, got {value!r}")
    text = str(value).strip()
    if text.startswith("-"):
        raise ValueError(f"{text!r} is negative; use a quantity >= 0 such as 500m, 2 or 4Gi")
    if not re.match(QUANTITY_PATTERN, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity; write e.g. 4, 500m, 16Gi or 1Ti")
    return text


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
def _list_map(*keys: str) -> dict[str, Any]:
    """Server-side apply merges such lists by key, and the server rejects duplicate keys."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


SubdomainName = Annotated[str, Field(pattern=DNS_1123_SUBDOMAIN, max_length=253)]
LabelValue = Annotated[str, Field(pattern=DNS_1123_SUBDOMAIN, max_length=63)]


def _dns_label(value: str, what: str, max_len: int, *, rfc1035: bool = False) -> str:
    pattern = DNS_1035_LABEL if rfc1035 else DNS_1123_LABEL
    if len(value) > max_len:
        raise ValueError(
            f"{what} {value!r} has {len(value)} characters, more than {max_len} (names of the children "
            f"derived from it must fit Kubernetes' 63-character limit); use at most {max_len} characters"
        )
    if not re.match(pattern, value):
        start = "a letter" if rfc1035 else "a letter or digit"
        raise ValueError(
            f"{what} {value!r} is not a DNS label; use lower-case letters, digits and '-', "
            f"starting with {start} and ending with a letter or digit"
        )
    return value


class StatusModel(Model):
    """Status is written by the operator and read back leniently (unknown keys ignored), so an
    older operator can read a newer status."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- metadata


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata the operator reads; everything else passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class DistillationMeta(ObjectMeta):
    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_label(v, "Distillation name", MAX_DISTILLATION_NAME, rfc1035=True)


class BranchJobMeta(ObjectMeta):
    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_label(v, "BranchJob name", MAX_BRANCHJOB_NAME, rfc1035=True)


# --------------------------------------------------------------------------- spec parts


class TeacherSpec(Model):
    """Where the trajectories came from. Descriptive only: nothing runs the teacher."""

    name: str = Field(min_length=1, max_length=200, description="e.g. DeepSeek-R1.")
    source: str | None = Field(default=None, description="How the trajectories were produced or obtained.")
    description: str | None = None


class OutputSpec(StorageConfig):
    """Root prefix of every stage output, and how to reach the storage (never the keys)."""

    uri: str = Field(description="s3://bucket/prefix, file:///path or a path on a mounted volume.")
    credentials_secret: SubdomainName | None = Field(
        default=None,
        description="Name of a Secret in the same namespace with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY; mounted into stage pods only.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "uri")

    def storage(self) -> StorageConfig:
        """What a stage config carries: the endpoint and region, not the Secret."""
        return StorageConfig(endpoint=self.endpoint, region=self.region)


class ImageSpec(Model):
    """The trainer image every stage pod runs."""

    image: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^\S+$",
        description=(
            "Trainer image; unset means the operator's default (BRANCHMERGE_TRAINER_IMAGE, "
            f"Helm trainer.image), else {DEFAULT_IMAGE}."
        ),
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[SubdomainName] = Field(default_factory=list, description="Image pull Secret names.")


class Toleration(Model):
    """A Kubernetes toleration (same fields as core/v1)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Placement(Model):
    """Per-pod CPU/memory (requests; memory is also the limit) and where pods may run."""

    cpu: Quantity | None = Field(default=None, description="CPU per pod, e.g. 8 or 500m.")
    memory: Quantity | None = Field(default=None, description="Memory per pod, e.g. 64Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: SubdomainName | None = None


class BranchResources(Placement):
    """A branch trains on `nodes` pods (one per node) with `gpusPerNode` GPUs each."""

    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = 1
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = Field(
        default=1, description="GPUs per pod (nvidia.com/gpu); 0 trains on CPU with one process per pod."
    )

    @property
    def data_parallel_size(self) -> int:
        """Training processes: one per GPU, or one per pod on CPU."""
        return self.nodes * max(self.gpus_per_node, 1)


class JobResources(Placement):
    """Resources of the single merge or eval pod."""

    gpus: Annotated[int, Field(ge=0, le=16)] = 0


class BranchSpec(Model):
    """One domain: the student fine-tuned on this domain's teacher trajectories."""

    name: str = Field(description="DNS label, unique, at most 20 characters; names the BranchJob <dist>-<name>.")
    datasets: list[DatasetRef] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    resources: BranchResources = Field(default_factory=BranchResources)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _dns_label(v, "branch name", MAX_BRANCH_NAME)
        if v in RESERVED_NAMES:
            raise ValueError(
                f"branch name {v!r} is reserved (it has a meaning in merge steps and eval models); "
                "pick another name, e.g. the domain"
            )
        return v


class MergeSpec(Model):
    """How the specialists become one model: an ordered chain of merge steps."""

    method: MergeMethod = "arcee_fusion"
    steps: list[MergeStepConfig] = Field(
        default_factory=list,
        description="Ordered merges. A model is a branch name, 'student', an earlier step's name "
        "or 'previous' (the previous step's output). Default: fold the branches in order, each "
        "next branch the base (TinyR1's order for [math, science, code]).",
    )
    dtype: Dtype = "bfloat16"
    out_dtype: Dtype | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    tokenizer_source: str | None = Field(
        default=None, description="Branch (or 'student') whose tokenizer the merged model carries; default the first base."
    )
    resources: JobResources = Field(default_factory=JobResources)

    def effective_steps(self, branches: list[str]) -> list[MergeStepConfig]:
        """The steps as written, or the default fold over the branches."""
        if self.steps:
            return list(self.steps)
        steps: list[MergeStepConfig] = []
        for i, name in enumerate(branches[1:], start=1):
            steps.append(MergeStepConfig(base=name, other=branches[0] if i == 1 else "previous"))
        return steps


EvalModel = Literal["merged", "student", "branches"]


def _default_eval_models() -> list[EvalModel]:
    return ["merged", "student"]


class EvalSpec(Model):
    """Which models are scored on which benchmarks; scores land in status.evaluation."""

    benchmarks: list[BenchmarkConfig] = Field(min_length=1, json_schema_extra=_list_map("name"))
    models: list[EvalModel] = Field(default_factory=_default_eval_models, min_length=1)
    batch_size: Annotated[int, Field(ge=1)] = 32
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    resources: JobResources = Field(default_factory=JobResources)


class RunPolicy(Model):
    """Retries and deadlines (Kubernetes Job semantics, for a whole gang or pipeline)."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = Field(
        default=3, description="Gang restarts after failures (disruptions such as eviction do not count)."
    )
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Fail (reason DeadlineExceeded) when still running after this long; "
        "the clock restarts on resume."
    )
    startup_deadline_seconds: Annotated[int, Field(ge=1)] = Field(
        default=600, description="Fail when a gang's pods are not all running this long after creation "
        "(reason names the cause, e.g. Unschedulable or ImagePullBackOff)."
    )
    suspend: bool = Field(default=False, description="Delete running pods (keeping progress) until set back to false.")
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Delete children (never this resource) this long after it finished."
    )


# --------------------------------------------------------------------------- cross-field rules


def _batch_issues(training: TrainingConfig, resources: BranchResources, prefix: str) -> list[Issue]:
    """Global batch must split evenly over micro batches on every data-parallel process."""
    dp = resources.data_parallel_size
    unit = training.micro_batch_size * dp
    gbs = training.global_batch_size
    if gbs % unit == 0:
        return []
    lower = max(unit, gbs - gbs % unit)
    upper = lower + unit if lower < gbs else lower
    procs = f"gpusPerNode {resources.gpus_per_node}" if resources.gpus_per_node else "1 process per pod (gpusPerNode 0)"
    return [
        Issue(
            f"{prefix}training.globalBatchSize",
            f"{gbs} is not divisible by microBatchSize {training.micro_batch_size} × data-parallel size {dp} = {unit} "
            f"(data-parallel size = nodes {resources.nodes} × {procs})",
            f"use a multiple of {unit} (e.g. {lower} or {upper}), or change microBatchSize or resources",
        )
    ]


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


#: Methods whose steps take a base and exactly / at least this many other models.
_ARITY: dict[str, tuple[bool, int, int | None]] = {
    # method: (base required, min others, max others)
    "arcee_fusion": (True, 1, 1),
    "slerp": (True, 1, 1),
    "task_arithmetic": (True, 1, None),
    "ties": (True, 1, None),
    "dare_linear": (True, 1, None),
    "dare_ties": (True, 1, None),
    "model_stock": (True, 2, None),
    "linear": (False, 1, None),
}


def _reference_issue(ref: str, field: str, known: set[str], *, first: bool) -> Issue | None:
    """A merge step names a model that is not (yet) available."""
    if ref == "previous" and first:
        return Issue(
            field,
            "'previous' means the previous step's output, and the first step has none",
            "name a branch or 'student' in the first step",
        )
    if ref not in known:
        return Issue(
            field,
            f"{ref!r} is not a branch, 'student', an earlier step or 'previous'",
            f"{_suggest(ref, known)}use one of: {', '.join(sorted(known))}",
        )
    return None


def _merge_issues(spec: DistillationSpec) -> list[Issue]:
    issues: list[Issue] = []
    branches = [b.name for b in spec.branches]
    merge = spec.merge
    if not merge.steps and len(branches) < 2:
        issues.append(
            Issue(
                "merge.steps",
                "with one branch there is nothing to fold; the default merge needs at least two branches",
                f"add a step such as {{base: student, other: {branches[0] if branches else '<branch>'}}} or add branches",
            )
        )
        return issues
    steps = merge.effective_steps(branches)
    models = set(branches) | {"student"}
    step_names: list[str] = []
    referenced: set[str] = set()
    for i, step in enumerate(steps):
        where = f"merge.steps[{i}]"
        name = step.name or f"step{i + 1}"
        if step.name is not None:
            try:
                _dns_label(step.name, "step name", MAX_STEP_NAME)
            except ValueError as e:
                issues.append(Issue(f"{where}.name", str(e).split("; ")[0], "use a short DNS label such as math-science"))
            if step.name in RESERVED_NAMES or step.name in models:
                issues.append(
                    Issue(f"{where}.name", f"{step.name!r} is already a branch or a reserved name", "give the step its own name")
                )
        if name in step_names:
            issues.append(Issue(f"{where}.name", f"duplicate step name {name!r}", "give every step a unique name"))
        known = models | set(step_names) | ({"previous"} if i > 0 else set())
        method = step.method or merge.method

        refs: list[str] = []
        fields: list[tuple[str, str]] = []
        if step.base is not None:
            fields.append((step.base, f"{where}.base"))
            refs.append(step.base)
        if step.other is not None:
            fields.append((step.other, f"{where}.other"))
        else:
            fields += [(entry.model, f"{where}.models[{j}].model") for j, entry in enumerate(step.models)]
        issues += [issue for ref, field in fields if (issue := _reference_issue(ref, field, known, first=i == 0))]
        others = [e.model for e in step.model_entries()]
        refs.extend(others)
        base_required, lo, hi = _ARITY[method]
        if base_required and step.base is None:
            issues.append(Issue(f"{where}.base", f"{method} needs a base model", "set base to the model to merge into"))
        if len(others) < lo or (hi is not None and len(others) > hi):
            want = f"exactly {lo}" if hi == lo else f"at least {lo}"
            issues.append(
                Issue(
                    where,
                    f"{method} merges a base and {want} other model(s); this step has {len(others)}",
                    "set base plus other (one model), or chain several pairwise steps" if hi == 1
                    else "list more models under models",
                )
            )
        if method == "linear" and step.base is None and len(others) < 2:
            issues.append(Issue(where, "linear needs at least two models", "list two or more models"))
        if len(set(refs)) != len(refs):
            issues.append(Issue(where, "a model appears twice in this step", "merge each model at most once per step"))
        if method == "slerp" and "t" not in step.parameters:
            issues.append(Issue(f"{where}.parameters", "slerp needs parameter t (0 = base, 1 = other)", "add parameters: {t: 0.5}"))
        for ref in refs:
            referenced.add(step_names[-1] if ref == "previous" and step_names else ref)
        step_names.append(name)
    for i, name in enumerate(step_names[:-1]):
        if name not in referenced:
            issues.append(
                Issue(
                    f"merge.steps[{i}]",
                    f"the output of step {name!r} is never used: only the last step's output is kept",
                    "refer to it in a later step ('previous' or its name), or remove the step",
                )
            )
    if merge.tokenizer_source is not None and merge.tokenizer_source not in models:
        issues.append(
            Issue(
                "merge.tokenizerSource",
                f"{merge.tokenizer_source!r} is not a branch or 'student'",
                f"{_suggest(merge.tokenizer_source, models)}use one of: {', '.join(sorted(models))}",
            )
        )
    return issues


def _eval_issues(spec: DistillationSpec) -> list[Issue]:
    issues: list[Issue] = []
    if spec.eval is None:
        return issues
    seen: set[str] = set()
    for i, bench in enumerate(spec.eval.benchmarks):
        if bench.name in seen:
            issues.append(Issue(f"eval.benchmarks[{i}].name", f"duplicate benchmark name {bench.name!r}", "give every benchmark a unique name"))
        seen.add(bench.name)
        if bench.preset is not None:
            kind = BENCHMARK_PRESETS[bench.preset]["kind"]
            if bench.kind != kind:
                issues.append(
                    Issue(f"eval.benchmarks[{i}].kind", f"preset {bench.preset} is a {kind} benchmark, not {bench.kind}", f"set kind: {kind} or drop the preset")
                )
    if len(set(spec.eval.models)) != len(spec.eval.models):
        issues.append(Issue("eval.models", "a model is listed twice", "list each of merged, student, branches at most once"))
    if "branches" in spec.eval.models and not spec.branches:
        issues.append(Issue("eval.models", "'branches' needs at least one branch", "remove 'branches' or add branches"))
    return issues


def _secret_issue(data: Any, path: str) -> Issue | None:
    """reject_inline_secrets as an Issue (its message already starts with the path)."""
    try:
        reject_inline_secrets(data, path)
    except ValueError as e:
        where, _, rest = str(e).partition(": ")
        message, _, fix = rest.partition("; put them")
        return Issue(where, message, ("put them" + fix) if fix else None)
    return None


# --------------------------------------------------------------------------- Distillation


class DistillationSpec(Model):
    """Branch (one SFT per domain), merge (a chain of merges), evaluate (optional)."""

    student: ModelRef = Field(description="The model every branch starts from.")
    teacher: TeacherSpec | None = None
    output: OutputSpec
    image: ImageSpec = Field(default_factory=ImageSpec)
    branches: list[BranchSpec] = Field(min_length=1, max_length=32, json_schema_extra=_list_map("name"))
    merge: MergeSpec = Field(default_factory=MergeSpec)
    eval: EvalSpec | None = Field(default=None, description="Omit to stop after the merge.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    queue_name: LabelValue | None = Field(default=None, description="Kueue LocalQueue; set as kueue.x-k8s.io/queue-name.")

    @model_validator(mode="after")
    def _cross_field(self) -> DistillationSpec:
        issues: list[Issue] = []
        seen: set[str] = set()
        for i, branch in enumerate(self.branches):
            if branch.name in seen:
                issues.append(Issue(f"branches[{i}].name", f"duplicate branch name {branch.name!r}", "give every branch a unique name"))
            seen.add(branch.name)
            issues.extend(_batch_issues(branch.training, branch.resources, f"branches[{i}]."))
        issues.extend(_merge_issues(self))
        issues.extend(_eval_issues(self))
        if issues:
            raise spec_error(issues)
        return self

    def branch(self, name: str) -> BranchSpec:
        return next(b for b in self.branches if b.name == name)


Phase = Literal["Pending", "Running", "Merging", "Evaluating", "Succeeded", "Failed", "Suspended"]
BranchPhase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]
StagePhase = Literal["Waiting", "Running", "Succeeded", "Failed", "Skipped"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A Kubernetes condition (metav1.Condition fields)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str | None = None
    last_transition_time: str
    observed_generation: int | None = None


class BranchStatus(StatusModel):
    name: str
    phase: BranchPhase = "Pending"
    progress: float | None = Field(default=None, description="Percent of optimizer steps done.")
    step: int | None = None
    total_steps: int | None = None
    output_uri: str | None = None
    fingerprint: str | None = None
    restarts: int = 0
    branch_job: str | None = None
    message: str | None = None


class MergeStatus(StatusModel):
    phase: StagePhase = "Waiting"
    fingerprint: str | None = None
    output_uri: str | None = None
    job_name: str | None = None
    message: str | None = None


class EvaluationStatus(StatusModel):
    phase: StagePhase = "Waiting"
    fingerprint: str | None = None
    job_name: str | None = None
    output_uri: str | None = None
    message: str | None = None
    results: list[Score] = Field(default_factory=list)


class DistillationStatus(StatusModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_list_map("type"))
    branches: list[BranchStatus] = Field(default_factory=list, json_schema_extra=_list_map("name"))
    merge: MergeStatus | None = None
    evaluation: EvaluationStatus | None = None
    branches_succeeded: str | None = Field(default=None, description="'done/total', for kubectl get.")
    merged_model: str | None = Field(default=None, description="URI of the merged model once written.")
    headline: str | None = Field(default=None, description="Merged model's scores, e.g. 'aime2024=78.1'.")
    start_time: str | None = None
    completion_time: str | None = None


class Distillation(Model):
    """Branch-Merge distillation of one student into one merged model."""

    api_version: Literal["branchmerge.io/v1alpha1"] = API_VERSION
    kind: Literal["Distillation"] = "Distillation"
    metadata: DistillationMeta
    spec: DistillationSpec
    status: DistillationStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and (issue := _secret_issue(data.get("spec"), "spec")):
            raise spec_error([issue])
        return data

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def generation(self) -> int:
        return self.metadata.generation or 1


# --------------------------------------------------------------------------- BranchJob


class BranchJobSpec(Model):
    """One full-SFT run as a gang of pods. The operator derives one per Distillation branch;
    it can also be applied on its own."""

    stage_name: str | None = Field(
        default=None, description="Branch name used in the output path; default the BranchJob's name."
    )
    student: ModelRef
    datasets: list[DatasetRef] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    resources: BranchResources = Field(default_factory=BranchResources)
    image: ImageSpec = Field(default_factory=ImageSpec)
    output: OutputSpec = Field(description="Root prefix; the model goes to <uri>/branches/<stageName>/<fingerprint>/model.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    queue_name: LabelValue | None = None

    @field_validator("stage_name")
    @classmethod
    def _stage_name(cls, v: str | None) -> str | None:
        return None if v is None else _dns_label(v, "stageName", MAX_BRANCHJOB_NAME)

    @model_validator(mode="after")
    def _cross_field(self) -> BranchJobSpec:
        issues = _batch_issues(self.training, self.resources, "")
        if issues:
            raise spec_error(issues)
        return self


class BranchJobStatus(StatusModel):
    observed_generation: int | None = None
    phase: BranchPhase | None = None
    reason: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_list_map("type"))
    progress: Progress | None = None
    restarts: int = Field(default=0, description="Gang restarts after failures (count against backoffLimit).")
    disruptions: int = Field(default=0, description="Gang restarts after eviction, preemption or node loss.")
    attempt: int = Field(default=0, description="Current gang attempt; pods carry it as a label.")
    fingerprint: str | None = None
    checkpoint_uri: str | None = None
    output_uri: str | None = None
    start_time: str | None = None
    completion_time: str | None = None


class BranchJob(Model):
    """One branch's SFT as a gang (one pod per node + a headless Service)."""

    api_version: Literal["branchmerge.io/v1alpha1"] = API_VERSION
    kind: Literal["BranchJob"] = "BranchJob"
    metadata: BranchJobMeta
    spec: BranchJobSpec
    status: BranchJobStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and (issue := _secret_issue(data.get("spec"), "spec")):
            raise spec_error([issue])
        return data

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def generation(self) -> int:
        return self.metadata.generation or 1

    @property
    def stage_name(self) -> str:
        return self.spec.stage_name or self.metadata.name


def merge_patch(model: BaseModel) -> dict[str, Any]:
    """A model as a JSON merge patch: unset fields become null so the server drops stale values
    (status patches are merge patches); lists are written whole, without nulls inside."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        value = getattr(model, name)
        if value is None:
            out[key] = None
        elif isinstance(value, BaseModel):
            out[key] = merge_patch(value)
        else:
            out[key] = model.model_dump(include={name}, by_alias=True, mode="json", exclude_none=True)[key]
    return out


Resource = Distillation | BranchJob
KINDS: dict[str, type[Distillation] | type[BranchJob]] = {"Distillation": Distillation, "BranchJob": BranchJob}


# --------------------------------------------------------------------------- loading


def plain(data: Any) -> Any:
    """Deep copy into plain dicts and lists (kopf bodies and other Mapping views included),
    so validation and the inline-secret scan see every key."""
    if isinstance(data, Mapping):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [plain(v) for v in data]
    return data


def check_manifest(data: Any, source: str = "") -> tuple[Resource | None, ValidationReport]:
    """Validate one manifest document (any Mapping); never raises for bad input."""
    report = ValidationReport(source=source)
    data = plain(data)
    if not isinstance(data, dict):
        report.add("", f"expected a mapping (a Kubernetes object), got {type(data).__name__}")
        return None, report
    kind = data.get("kind")
    if kind not in KINDS:
        report.add("kind", f"unknown kind {kind!r}", f"use one of: {', '.join(KINDS)} (apiVersion {API_VERSION})")
        return None, report
    if data.get("apiVersion") != API_VERSION:
        report.add("apiVersion", f"{data.get('apiVersion')!r} is not served", f"use apiVersion: {API_VERSION}")
        return None, report
    model = KINDS[kind]
    try:
        return model.model_validate(data), report
    except ValidationError as e:
        report.extend_from(e, model)
        return None, report


def parse_manifest(data: Any, source: str = "") -> Resource:
    """One validated resource, or ManifestError with readable issues."""
    obj, report = check_manifest(data, source)
    if obj is None:
        raise ManifestError([report])
    return obj


def is_branchmerge(doc: Any) -> bool:
    """Whether a document is addressed to this API (group branchmerge.io, or no apiVersion at
    all) rather than, say, a Secret or Namespace shipped in the same file."""
    if not isinstance(doc, Mapping) or not doc.get("apiVersion"):
        return True
    return str(doc["apiVersion"]).split("/")[0] == GROUP


def read_documents(path: str | Path) -> list[Any]:
    """All non-empty YAML documents of a file ('-' reads stdin)."""
    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_manifests(path: str | Path) -> list[Resource]:
    """Every Distillation/BranchJob in a (multi-document) YAML file, validated; documents of
    other API groups (a Secret next to the Distillation) are skipped.

    Raises ManifestError listing the problems of every invalid document, or a
    yaml.YAMLError / OSError for an unreadable file.
    """
    out: list[Resource] = []
    bad: list[ValidationReport] = []
    for i, doc in enumerate(read_documents(path)):
        if not is_branchmerge(doc):
            continue
        obj, report = check_manifest(doc, f"{path}#{i + 1}")
        if obj is None:
            bad.append(report)
        else:
            out.append(obj)
    if bad:
        raise ManifestError(bad)
    return out

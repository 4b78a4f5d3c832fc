"""The contract between the control plane and the workloads.

A stage (SFT, Merge, Eval) receives one of these configs as JSON and ends by writing a
`StageResult` to its result path (a pod's termination-message file in the cluster). The
planner produces the configs; the operator and the local executor hand them over unchanged
to ``branchmerge-train <stage> --config FILE``. This module is pure pydantic: the operator
image imports it without torch.

Hyperparameter models defined here (`TrainingConfig`, `MergeStepConfig`, `BenchmarkConfig`)
are also the building blocks of the user-facing API, so there is one definition of each knob.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_VERSION: Literal["branchmerge.io/v1alpha1"] = "branchmerge.io/v1alpha1"

#: A stage prints one line starting with this prefix (then Progress JSON) per report. The
#: operator reads rank 0's last such line from the pod log, so training pods need no
#: Kubernetes credentials; the local executor reads the same lines from the subprocess.
PROGRESS_PREFIX = "BRANCHMERGE_PROGRESS "

#: Kubernetes caps a termination message at 4096 bytes; results must fit with room to spare.
MAX_RESULT_BYTES = 3800

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
URI_PATTERN = r"^(s3://[^/\s]+(/\S*)?|file://\S+|/\S*)$"

#: Words that smell like a credential; a spec must reference a Secret instead. Matched
#: against the key split into words (camelCase / snake_case / kebab-case), so that
#: `maxNewTokens` or `tokenizerSource` are not mistaken for a `token`.
_SECRET_KEY_WORDS = re.compile(
    r"(^|_)(secret|password|passwd|token|credentials?|session_token)(_|$)|(access|secret|api|private)_?key",
    re.I,
)
#: Values that are unmistakably cloud credentials (AWS access key ids).
_SECRET_VALUES = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _key_words(key: str) -> str:
    """`secretAccessKey` / `SECRET-ACCESS-KEY` -> `secret_access_key`."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)
    return re.sub(r"[^a-z0-9]+", "_", snake.lower()).strip("_")


class Model(BaseModel):
    """Base for everything that crosses a process or API boundary.

    camelCase on the wire (Kubernetes convention), snake_case in Python, unknown fields
    rejected so that a typo is an error instead of a silently ignored setting.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def dump(self) -> dict[str, Any]:
        """Wire form: camelCase, JSON types, unset optional fields left out."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def fingerprint(payload: Any) -> str:
    """Stable content hash of a JSON-able payload (sorted keys, no whitespace)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_uri(value: str, field: str) -> str:
    """Accept s3://bucket/key, file:///path or an absolute path on a mounted volume."""
    if not re.match(URI_PATTERN, value):
        raise ValueError(
            f"{field}: {value!r} is not a storage URI; use s3://bucket/prefix, "
            "file:///absolute/path or an absolute path on a mounted volume"
        )
    if value.startswith("s3://") and "@" in value.split("/", 3)[2]:
        raise ValueError(
            f"{field}: credentials must not be embedded in the URI; "
            "reference a Secret with output.credentialsSecret"
        )
    return value


def reject_inline_secrets(data: Any, path: str = "spec") -> None:
    """Raise if a mapping key looks like a credential (keys belong in a referenced Secret)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and _SECRET_KEY_WORDS.search(_key_words(key)) and key != "credentialsSecret":
                raise ValueError(
                    f"{path}.{key}: credentials are not allowed in the spec; put them in a "
                    "Kubernetes Secret and name it in spec.output.credentialsSecret"
                )
            reject_inline_secrets(value, f"{path}.{key}")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            reject_inline_secrets(item, f"{path}[{i}]")
    elif isinstance(data, str) and _SECRET_VALUES.search(data):
        raise ValueError(
            f"{path}: looks like a cloud access key; credentials are not allowed in the spec; put them "
            "in a Kubernetes Secret and name it in spec.output.credentialsSecret"
        )


# --------------------------------------------------------------------------- storage


class StorageConfig(Model):
    """Where a stage's URIs live. Never carries credentials: those come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from a referenced Secret)."""

    endpoint: str | None = Field(default=None, description="S3 endpoint URL (MinIO, Ceph, …); empty for AWS.")
    region: str | None = Field(default=None, description="S3 region.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s@]+(/\S*)?$", v):
            raise ValueError(
                f"endpoint: {v!r} must be an http(s) URL without credentials, e.g. http://minio:9000"
            )
        return v


class ModelRef(Model):
    """A Hugging Face-format model directory in storage."""

    uri: str = Field(description="s3://bucket/prefix, file:///path or a path on a mounted volume.")
    revision: str | None = Field(
        default=None, description="Optional content tag; changing it re-runs the stages that use the model."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "uri")


class DatasetRef(Model):
    """One file (or prefix of files) of chat trajectories."""

    uri: str = Field(description="JSONL or Parquet file, or a prefix holding several.")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    revision: str | None = Field(
        default=None, description="Optional content tag; changing it re-runs this branch."
    )
    max_samples: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Use at most this many records (first N)."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "uri")


# --------------------------------------------------------------------------- SFT


class TrainingConfig(Model):
    """Full-SFT hyperparameters. Defaults are TinyR1-32B-Preview's math branch."""

    epochs: Annotated[float, Field(gt=0, le=1000)] = 5
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Stop after this many optimizer steps (overrides epochs when smaller)."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-5
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    global_batch_size: Annotated[int, Field(ge=1)] = 96
    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    max_sequence_length: Annotated[int, Field(ge=16, le=1_048_576)] = 16384
    truncation: Literal["drop", "truncate"] = Field(
        default="drop", description="What to do with a sample longer than maxSequenceLength."
    )
    packing: Literal["none", "packed", "neat"] = "packed"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    adam_epsilon: Annotated[float, Field(gt=0, le=1)] = 1e-8
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    seed: Annotated[int, Field(ge=0)] = 42
    gradient_checkpointing: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp32"] = "bf16"
    checkpoint_interval: Annotated[int, Field(ge=1)] = Field(
        default=200, description="Save a resumable checkpoint every N optimizer steps."
    )
    logging_interval: Annotated[int, Field(ge=1)] = 1


class DistributedConfig(Model):
    """How many processes the training stage runs as (torchrun's view)."""

    nnodes: Annotated[int, Field(ge=1)] = 1
    nproc_per_node: Annotated[int, Field(ge=1)] = 1

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


class StageBase(Model):
    api_version: Literal["branchmerge.io/v1alpha1"] = API_VERSION
    name: str = Field(description="Human name of the stage, e.g. 'branch-math'.")
    fingerprint: str = Field(description="Hash of this config and its inputs' fingerprints.")
    output: str = Field(description="URI prefix this stage publishes to (with _MANIFEST.json last).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    result_path: str = Field(
        default="/dev/termination-log", description="Where the StageResult JSON is written at exit."
    )

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_uri(v, "output")


class SFTStage(StageBase):
    kind: Literal["SFT"] = "SFT"
    student: ModelRef
    datasets: list[DatasetRef] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoints: str = Field(description="URI prefix for resumable checkpoints.")

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: str) -> str:
        return check_uri(v, "checkpoints")


# --------------------------------------------------------------------------- merge

MergeMethod = Literal[
    "arcee_fusion",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "model_stock",
]

#: Parameter value: a scalar, a per-layer gradient (interpolated over depth), or filtered values.
ParamValue = float | list[float] | list[dict[str, Any]]


class MergeModelEntry(Model):
    model: str = Field(description="A branch name, 'student', an earlier step's name, or 'previous'.")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MergeStepConfig(Model):
    """One merge: `models` (fused into `base` where the method has a base)."""

    name: str | None = Field(default=None, description="Name later steps may refer to; default stepN.")
    method: MergeMethod | None = Field(default=None, description="Overrides merge.method for this step.")
    base: str | None = Field(default=None, description="Base model (kept by Arcee Fusion).")
    other: str | None = Field(default=None, description="Shorthand for models: [other].")
    models: list[MergeModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of(self) -> MergeStepConfig:
        if self.other is not None and self.models:
            raise ValueError("give either 'other' or 'models' in a merge step, not both")
        if self.other is None and not self.models:
            raise ValueError("a merge step needs 'other' (one model) or 'models' (a list)")
        return self

    def model_entries(self) -> list[MergeModelEntry]:
        """`other` normalised to a one-entry list."""
        if self.other is not None:
            return [MergeModelEntry(model=self.other)]
        return list(self.models)


Dtype = Literal["bfloat16", "float16", "float32"]


class ResolvedMergeStep(Model):
    """A merge step with every model reference resolved to a key of MergeStage.models
    (or an earlier step's name)."""

    name: str
    method: MergeMethod
    base: str | None = None
    models: list[MergeModelEntry]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MergeStage(StageBase):
    kind: Literal["Merge"] = "Merge"
    models: dict[str, ModelRef] = Field(description="Input models by name.")
    steps: list[ResolvedMergeStep] = Field(min_length=1)
    dtype: Dtype = "bfloat16"
    out_dtype: Dtype | None = None
    tokenizer_source: str = Field(description="Name of the model whose tokenizer the output carries.")
    seed: int = 0
    shard_size_mb: Annotated[int, Field(ge=1)] = 2000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    committed_models: list[str] = Field(
        default_factory=list,
        description="Models that must be committed stage outputs (with _MANIFEST.json), e.g. branch outputs; "
        "other models may be plain Hugging Face directories.",
    )
    prefetch_mb: Annotated[int, Field(ge=16)] = Field(
        default=256, description="Bound on tensor bytes read ahead and in flight (memory ~ this + one tensor)."
    )


# --------------------------------------------------------------------------- eval

BenchmarkKind = Literal["math", "multiple_choice", "code"]


class BenchmarkConfig(Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=40)
    uri: str
    kind: BenchmarkKind
    preset: Literal["aime2024", "gpqa_diamond", "livecodebench"] | None = Field(
        default=None, description="Fill unset sampling fields with the paper's protocol for this benchmark."
    )
    samples: Annotated[int, Field(ge=1, le=1024)] = 1
    temperature: Annotated[float, Field(ge=0, le=5)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_new_tokens: Annotated[int, Field(ge=1)] = 32768
    prompt: str | None = Field(default=None, description="Template with {problem}/{question}; default per kind.")
    system_prompt: str | None = None
    max_problems: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    code_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "uri")

    def with_preset(self) -> BenchmarkConfig:
        """This benchmark with its preset's protocol filled into the fields the user left unset
        (explicit settings win). The planner calls it, so fingerprints and the eval stage see
        the final values."""
        if self.preset is None:
            return self
        preset = BENCHMARK_PRESETS[self.preset]
        update = {k: v for k, v in preset.items() if k != "kind" and k not in self.model_fields_set}
        return self.model_copy(update=update)


#: The paper's evaluation protocol (sampling, pass@1 averaged over N samples per problem).
BENCHMARK_PRESETS: dict[str, dict[str, Any]] = {
    "aime2024": {"kind": "math", "samples": 16, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768},
    "livecodebench": {"kind": "code", "samples": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768},
    "gpqa_diamond": {
        "kind": "multiple_choice",
        "samples": 4,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_new_tokens": 32768,
    },
}


class EvalStage(StageBase):
    kind: Literal["Eval"] = "Eval"
    models: dict[str, ModelRef] = Field(min_length=1, description="Models to score, by display name.")
    benchmarks: list[BenchmarkConfig] = Field(min_length=1)
    batch_size: Annotated[int, Field(ge=1)] = 32
    backend: Literal["auto", "transformers", "vllm"] = "auto"


Stage = Annotated[SFTStage | MergeStage | EvalStage, Field(discriminator="kind")]


class StageEnvelope(Model):
    """Parse any stage config by its `kind`."""

    stage: Stage


def parse_stage(data: dict[str, Any]) -> SFTStage | MergeStage | EvalStage:
    return StageEnvelope.model_validate({"stage": data}).stage


# --------------------------------------------------------------------------- results


class Score(Model):
    model: str
    benchmark: str
    score: float = Field(description="pass@1 averaged over samples, in [0, 1].")
    samples: int = Field(description="Samples scored (problems × samples per problem).")
    problems: int | None = None
    mean_response_tokens: float | None = None
    truncated_fraction: float | None = None


class StageError(Model):
    reason: str = Field(description="CamelCase reason, e.g. InvalidData, OutOfMemory.")
    message: str


class StageResult(Model):
    """What a stage reports at exit (termination message). Small by construction."""

    api_version: Literal["branchmerge.io/v1alpha1"] = API_VERSION
    kind: Literal["SFT", "Merge", "Eval"]
    status: Literal["Succeeded", "Failed"]
    fingerprint: str
    output: str | None = None
    cached: bool = Field(default=False, description="True when a committed output was reused.")
    metrics: dict[str, float] = Field(default_factory=dict)
    scores: list[Score] = Field(default_factory=list)
    error: StageError | None = None
    scores_omitted: int = Field(
        default=0, description="Scores left out of this (size-capped) result; all are in the manifest."
    )

    def to_json(self) -> str:
        """Compact JSON within MAX_RESULT_BYTES that always parses: detail goes before scores,
        and scores that still do not fit are counted in ``scoresOmitted`` (every score stays
        in the stage's manifest)."""
        data = self.dump()
        if _fits(data):
            return _compact(data)
        if data.get("error"):
            data["error"]["message"] = data["error"]["message"][:1000] + " …(truncated)"
        if not _fits(data):
            data["metrics"] = dict(list(data.get("metrics", {}).items())[:20])
        if not _fits(data):
            keep = ("model", "benchmark", "score", "samples")
            data["scores"] = [{k: s[k] for k in keep if k in s} for s in data.get("scores", [])]
        while not _fits(data) and data.get("scores"):
            data["scores"].pop()
            data["scoresOmitted"] = data.get("scoresOmitted", 0) + 1
        if not _fits(data):
            data["metrics"] = {}
        return _compact(data)


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def _fits(data: dict[str, Any]) -> bool:
    return len(_compact(data).encode()) <= MAX_RESULT_BYTES


class Progress(Model):
    """Training progress, reported while a stage runs."""

    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: float | None = None
    bytes_done: int | None = Field(default=None, description="Bytes processed so far (merge: output bytes written).")
    bytes_total: int | None = None

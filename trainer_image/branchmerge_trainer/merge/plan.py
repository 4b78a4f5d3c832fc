"""Turn a MergeStage into a fully checked, per-tensor plan before any weight is read.

Everything that can be wrong with a merge is found here, from config files and safetensors
headers alone: unknown models or steps, wrong arity, unknown or out-of-range parameters,
different architectures, missing or extra tensors, shape mismatches (vocabulary rows
excepted), unsupported dtypes, missing shards, corrupt headers, missing tokenizer files.
Each error names the model, step and tensor involved. mergekit discovers most of these
only while merging, after the downloads.

Chained steps need no intermediate checkpoint: every method works tensor by tensor with the
same tensor names in and out, so the engine evaluates the whole chain for one tensor before
moving to the next one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..runtime import StageInputError
from ..stages import MergeStage, ModelRef, ParamValue, StorageConfig
from ..storage import Storage, storage_for
from .checkpoint import Checkpoint, open_checkpoint
from .methods import MethodSpec, get_method
from .params import check_value, depth_fraction, layer_index, resolve
from .safetensors_io import CODE_OF, DTYPES, FLOAT_CODES, OutTensor, ShardLayout, plan_shards

#: config.json keys that must agree between all inputs.
ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StepPlan:
    name: str
    method: MethodSpec
    inputs: list[str]  # model or earlier step names; the base first when there is one
    base: int | None
    input_params: list[Mapping[str, ParamValue]]  # each input's own settings
    step_params: Mapping[str, ParamValue]


@dataclass
class TensorPlan:
    index: int
    name: str
    kind: Literal["merge", "copy"]  # copy: a non-float buffer, taken from the base/first input
    out: OutTensor
    leaves: list[str]  # models whose tensor is read
    vocab: bool  # rows may differ between inputs and are cut to the smallest
    # per step: (parameters per input, shared parameters)
    params: dict[str, tuple[list[dict[str, float]], dict[str, float]]]
    est_bytes: int  # memory this tensor needs while in flight


@dataclass
class MergePlan:
    checkpoints: dict[str, Checkpoint]
    steps: list[StepPlan]
    tensors: list[TensorPlan]
    shards: list[ShardLayout]
    work_dtype: torch.dtype
    out_dtype: torch.dtype
    config_source: str
    tokenizer_source: str
    out_config: dict[str, Any]
    last_use: dict[str, int] = field(default_factory=dict)  # source -> last step index using it
    vocab_rows: int | None = None

    @property
    def final(self) -> StepPlan:
        return self.steps[-1]

    @property
    def bytes_in(self) -> int:
        return sum(self.checkpoints[m].tensors[t.name].entry.nbytes for t in self.tensors for m in t.leaves)

    @property
    def bytes_out(self) -> int:
        return sum(s.size for s in self.shards)


def _err(msg: str) -> StageInputError:
    return StageInputError(msg)


def _steps(stage: MergeStage) -> list[StepPlan]:
    """Structural checks of the step list (no I/O); returns only the steps the last one needs."""
    models = set(stage.models)
    seen: dict[str, int] = {}
    steps: list[StepPlan] = []
    for i, step in enumerate(stage.steps):
        where = f"merge step {step.name!r}"
        if step.name in models:
            raise _err(f"{where}: a step cannot have the same name as a model")
        if step.name in seen:
            raise _err(f"{where}: duplicate step name")
        method = get_method(step.method)

        def ref(name: str, where: str = where, i: int = i) -> str:
            if name in models or name in seen:
                return name
            later = [s.name for s in stage.steps[i:]]
            hint = " (steps can only use earlier steps)" if name in later else ""
            raise _err(
                f"{where}: unknown model {name!r}{hint}; models: {sorted(models)}, earlier steps: {list(seen)}"
            )

        entries = {e.model: e for e in step.models}
        if len(entries) != len(step.models):
            raise _err(f"{where}: a model is listed twice")
        inputs: list[str] = []
        params: list[Mapping[str, ParamValue]] = []
        base: int | None = None
        if step.base is not None:
            inputs.append(ref(step.base))
            params.append(entries[step.base].parameters if step.base in entries else {})
            base = 0
        elif method.base == "required":
            raise _err(f"{where}: method {method.name} needs a base model ('base')")
        for e in step.models:
            if e.model != step.base:
                inputs.append(ref(e.model))
                params.append(e.parameters)
        n = len(inputs)
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            want = (
                f"exactly {method.min_inputs}"
                if method.max_inputs == method.min_inputs
                else f"at least {method.min_inputs}"
                + (f" and at most {method.max_inputs}" if method.max_inputs is not None else "")
            )
            raise _err(
                f"{where}: method {method.name} takes {want} models including the base, got {n} ({inputs}); "
                + ("chain pairwise steps to fuse more models" if method.max_inputs == 2 else "")
            )
        # Parameter names and shapes.
        allowed_step = {p.name for p in method.params}
        for pname, value in step.parameters.items():
            if pname not in allowed_step:
                raise _err(
                    f"{where}: unknown parameter {pname!r} for {method.name}; known: {sorted(allowed_step) or 'none'}"
                )
            check_value(value, f"{where}: parameter {pname!r}")
        for j, (src, p) in enumerate(zip(inputs, params, strict=True)):
            scopes = ("input",) if j == base else ("input", "non_base")
            allowed = {q.name for q in method.scoped(*scopes)}
            for pname, value in p.items():
                if pname not in allowed:
                    what = "the base model" if j == base else f"model {src!r}"
                    raise _err(
                        f"{where}: parameter {pname!r} does not apply to {what} in {method.name}; "
                        f"per-model parameters here: {sorted(allowed) or 'none'}"
                    )
                check_value(value, f"{where}: model {src!r} parameter {pname!r}")
        seen[step.name] = i
        steps.append(StepPlan(step.name, method, inputs, base, params, dict(step.parameters)))
    # Keep what the final step needs; anything else would be silently wasted work.
    needed = {steps[-1].name}
    for s in reversed(steps):
        if s.name in needed:
            needed.update(x for x in s.inputs if x in seen)
    unused = [s.name for s in steps if s.name not in needed]
    if unused:
        raise _err(
            f"merge steps {unused} are not used by the final step {steps[-1].name!r}; remove them or chain them"
        )
    return steps


def _leaf(steps: Mapping[str, StepPlan], source: str) -> str:
    """The model a step's output 'descends' from: its base, else its first input."""
    while source in steps:
        s = steps[source]
        source = s.inputs[s.base if s.base is not None else 0]
    return source


def _check_architectures(cks: Mapping[str, Checkpoint], ref_name: str) -> None:
    ref = cks[ref_name].config
    for name, ck in cks.items():
        for key in ARCH_KEYS:
            if key not in ref or key not in ck.config:
                continue  # an absent key means the library default; tensor shapes still must match
            a, b = ref[key], ck.config[key]
            if a != b:
                raise _err(
                    f"models {ref_name!r} and {name!r} have different architectures: "
                    f"config.json {key} = {a!r} vs {b!r}; only models of one architecture can be merged"
                )


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return int(v) if isinstance(v, int) else None


def build_plan(stage: MergeStage, storage_of: Callable[[str], Storage] | None = None) -> MergePlan:
    """Validate ``stage`` against its inputs' metadata and plan every output tensor; every
    problem is a StageInputError (or a storage error) naming what to fix."""
    try:
        return _build_plan(stage, storage_of)
    except StageInputError:
        raise
    except ValueError as e:  # parameter checks and the like: still bad input
        raise StageInputError(str(e)) from None


def _build_plan(stage: MergeStage, storage_of: Callable[[str], Storage] | None) -> MergePlan:
    cache: dict[str, Storage] = {}

    def default_storage(uri: str, cfg: StorageConfig = stage.storage) -> Storage:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme not in cache:
            cache[scheme] = storage_for(uri, cfg)
        return cache[scheme]

    storage_of = storage_of or default_storage
    steps = _steps(stage)
    by_name = {s.name: s for s in steps}
    used_models = sorted(
        {x for s in steps for x in s.inputs if x in stage.models}, key=list(stage.models).index
    )
    if stage.tokenizer_source not in stage.models:
        raise _err(
            f"tokenizerSource {stage.tokenizer_source!r} is not one of the models {sorted(stage.models)}"
        )
    unknown = set(stage.committed_models) - set(stage.models)
    if unknown:
        raise _err(f"committedModels names unknown models {sorted(unknown)}")
    out_uri = stage.output.rstrip("/")
    for name, mref in stage.models.items():
        uri = mref.uri.rstrip("/")
        if out_uri == uri or out_uri.startswith(uri + "/") or uri.startswith(out_uri + "/"):
            raise _err(
                f"output {stage.output} overlaps the input model {name!r} ({mref.uri}); write elsewhere"
            )

    needed = set(used_models) | {stage.tokenizer_source}
    cks: dict[str, Checkpoint] = {}
    for name in [m for m in stage.models if m in needed]:
        ref: ModelRef = stage.models[name]
        cks[name] = open_checkpoint(
            name, ref, storage_of(ref.uri), require_manifest=name in stage.committed_models
        )
    config_source = _leaf(by_name, steps[-1].name)
    _check_architectures({m: cks[m] for m in used_models}, config_source)
    tok = cks[stage.tokenizer_source]
    if not tok.tokenizer_files():
        raise _err(f"tokenizerSource {stage.tokenizer_source!r} ({tok.uri}) has no tokenizer files")

    # Same tensor names everywhere.
    ref_ck = cks[config_source]
    names = ref_ck.order
    ref_set = set(names)
    for m in used_models:
        other = set(cks[m].tensors)
        if other != ref_set:
            missing = sorted(ref_set - other)
            extra = sorted(other - ref_set)
            detail = f"has no tensor {missing[0]!r}" if missing else f"has an extra tensor {extra[0]!r}"
            count = f" ({len(missing)} missing, {len(extra)} extra in all)"
            raise _err(f"model {m!r} {detail} that {config_source!r} {'has' if missing else 'lacks'}{count}")

    work_dtype = TORCH_DTYPES[stage.dtype]
    out_dtype = TORCH_DTYPES[stage.out_dtype or stage.dtype]
    num_layers = int(ref_ck.config.get("num_hidden_layers") or 0) or (
        1 + max((layer_index(n) or 0) for n in names)
    )
    vocab_sizes = {m: _vocab_size(cks[m].config) for m in used_models}
    vocab_rows: int | None = None
    tensors: list[TensorPlan] = []
    for tname in names:
        entries = {m: cks[m].tensors[tname].entry for m in used_models}
        first = entries[config_source]
        codes = {e.dtype for e in entries.values()}
        for m, e in entries.items():
            if e.dtype not in DTYPES:
                raise _err(
                    f"model {m!r} tensor {tname!r} has dtype {e.dtype}: quantized weights cannot be merged; "
                    "merge the unquantized checkpoints"
                )
        is_float = codes <= FLOAT_CODES
        if not is_float and len(codes) > 1:
            raise _err(f"tensor {tname!r} has different non-float dtypes {sorted(codes)} across models")
        shapes = {m: e.shape for m, e in entries.items()}
        vocab = False
        if len(set(shapes.values())) > 1:
            tails = {s[1:] for s in shapes.values()}
            rows_match_vocab = all(
                len(s) >= 1 and vocab_sizes[m] is not None and s[0] == vocab_sizes[m]
                for m, s in shapes.items()
            )
            if len(tails) == 1 and rows_match_vocab and is_float:
                vocab = True
            else:
                a, b = (
                    (m for m in used_models if shapes[m] != shapes[config_source]).__next__(),
                    config_source,
                )
                raise _err(
                    f"tensor {tname!r} has shape {list(shapes[a])} in model {a!r} but {list(shapes[b])} in {b!r}"
                )
        # Rows after each step's vocabulary cut (the smallest of its inputs).
        rows: dict[str, int] = {m: s[0] if s else 1 for m, s in shapes.items()}
        t = depth_fraction(tname, num_layers)
        params: dict[str, tuple[list[dict[str, float]], dict[str, float]]] = {}
        for s in steps:
            rows[s.name] = min(rows[x] for x in s.inputs)
            if is_float:
                params[s.name] = _resolve_params(s, tname, t)
        shape = first.shape
        if vocab:
            shape = (rows[steps[-1].name], *first.shape[1:])
            vocab_rows = shape[0]
        out_code = CODE_OF[out_dtype] if is_float else first.dtype
        out = OutTensor(tname, out_code, tuple(shape))
        sizes = [DTYPES[e.dtype][1] for e in entries.values()]
        est = _live_bytes(steps, math.prod(first.shape), sizes, work_dtype, DTYPES[out_code][1])
        leaves = list(used_models) if is_float else [config_source]
        kind: Literal["merge", "copy"] = "merge" if is_float else "copy"
        tensors.append(TensorPlan(len(tensors), tname, kind, out, leaves, vocab, params, est))
    shards = plan_shards([t.out for t in tensors], stage.shard_size_mb * 1024 * 1024)
    last_use: dict[str, int] = {}
    for i, s in enumerate(steps):
        for x in s.inputs:
            last_use[x] = i
    out_config = dict(ref_ck.config)
    out_config["torch_dtype" if "torch_dtype" in out_config else "dtype"] = stage.out_dtype or stage.dtype
    if vocab_rows is not None:
        out_config["vocab_size"] = vocab_rows
    return MergePlan(
        checkpoints=cks,
        steps=steps,
        tensors=tensors,
        shards=shards,
        work_dtype=work_dtype,
        out_dtype=out_dtype,
        config_source=config_source,
        tokenizer_source=stage.tokenizer_source,
        out_config=out_config,
        last_use=last_use,
        vocab_rows=vocab_rows,
    )


#: Chunk scratch of one method call (a few float32 chunks per input), on top of the tensors.
SCRATCH_BYTES = 4 << 20


def _live_bytes(
    steps: list[StepPlan], numel: int, in_sizes: list[int], work: torch.dtype, out_size: int
) -> int:
    """Peak bytes one output tensor holds while its chain runs: inputs are read when first
    needed and dropped after their last use (as the engine does), plus the step's output."""
    work_size = torch.empty((), dtype=work).element_size()
    per = numel * max(max(in_sizes, default=2), work_size, out_size)
    live: set[str] = set()
    last = {x: i for i, s in enumerate(steps) for x in s.inputs}
    peak = 0
    for i, s in enumerate(steps):
        live.update(s.inputs)
        peak = max(peak, (len(live) + 1) * per)
        live.add(s.name)
        live -= {x for x in s.inputs if last[x] == i}
    return peak + SCRATCH_BYTES


def _resolve_params(step: StepPlan, tensor: str, t: float) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Every parameter of ``step`` for ``tensor``, checked against the method's spec."""
    where = f"merge step {step.name!r}, tensor {tensor!r}"
    shared: dict[str, float] = {}
    for p in step.method.scoped("shared"):
        v = resolve(p.name, [step.step_params], tensor, t, p.default)
        if v is None:
            raise _err(f"{where}: parameter {p.name!r} is required by {step.method.name}")
        shared[p.name] = p.check(v, where)
    per_input: list[dict[str, float]] = []
    for j, src in enumerate(step.inputs):
        scopes = ("input",) if j == step.base else ("input", "non_base")
        values: dict[str, float] = {}
        for p in step.method.scoped(*scopes):
            v = resolve(p.name, [step.input_params[j], step.step_params], tensor, t, p.default)
            if v is None:
                raise _err(
                    f"{where}: parameter {p.name!r} is required for model {src!r} by {step.method.name}"
                )
            values[p.name] = p.check(v, f"{where}, model {src!r}")
        per_input.append(values)
    if step.method.name == "linear" and shared.get("normalize") and sum(v["weight"] for v in per_input) == 0:
        raise _err(f"{where}: the linear weights sum to 0 and cannot be normalized")
    return per_input, shared

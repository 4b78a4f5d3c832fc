"""Import mergekit YAML recipes into our merge steps, so users bring the configs they have.

Supported per document: ``merge_method``, ``base_model``, ``models`` (``model`` +
``parameters``), ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (a model or
``base``), ``tokenizer: {source: …}`` and ``name``. Several documents (``---``) form a chain
as in ``mergekit-multi``: a document with a ``name`` is an intermediate that later documents
use as a model; the unnamed one (or the one nobody uses) is the result. Everything else —
``slices``, ``modules``, ``chat_template``, union tokenizers, LoRA references, hub model ids,
methods we do not implement — is an error that says so, never silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import yaml

from ..stages import Dtype, MergeMethod, MergeModelEntry, MergeStage, ModelRef, ParamValue, ResolvedMergeStep
from .methods import METHODS

DOC_KEYS = {
    "name",
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
DTYPES: dict[str, Dtype] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


class MergekitConfigError(ValueError):
    """A mergekit YAML we cannot import; the message says where and why."""


@dataclass
class ImportedMerge:
    """Models, steps (in dependency order, the result last) and dtypes from a mergekit YAML."""

    models: dict[str, ModelRef]
    steps: list[ResolvedMergeStep]
    dtype: Dtype | None
    out_dtype: Dtype | None
    tokenizer_source: str

    def to_stage(self, *, name: str, output: str, fingerprint: str, **fields: Any) -> MergeStage:
        """A MergeStage running this merge (extra fields: seed, shardSizeMb, storage, …)."""
        data: dict[str, Any] = {
            "name": name,
            "output": output,
            "fingerprint": fingerprint,
            "models": self.models,
            "steps": self.steps,
            "tokenizer_source": self.tokenizer_source,
            **fields,
        }
        if self.dtype is not None:
            data.setdefault("dtype", self.dtype)
        if self.out_dtype is not None:
            data.setdefault("out_dtype", self.out_dtype)
        return MergeStage.model_validate(data)


def _uri(ref: Any, where: str, base_dir: str | None) -> str:
    if isinstance(ref, dict):
        raise MergekitConfigError(f"{where}: only plain model paths are supported, got {ref!r}")
    if not isinstance(ref, str) or not ref:
        raise MergekitConfigError(f"{where}: a model must be a path or URI, got {ref!r}")
    if "+" in ref:
        raise MergekitConfigError(
            f"{where}: {ref!r}: LoRA references (model+lora) are not supported; merge the LoRA first"
        )
    if ref.startswith(("s3://", "file://", "/")):
        return ref
    if base_dir is not None:
        return base_dir.rstrip("/") + "/" + ref
    raise MergekitConfigError(
        f"{where}: {ref!r} is neither an absolute path nor a storage URI (s3://…, file://…); hub model ids are "
        "not downloaded: put the model in storage and use its URI"
    )


def _param(value: Any, where: str) -> ParamValue:
    """mergekit parameter setting -> our ParamValue (numbers, gradients, filter lists)."""

    def number(v: Any) -> float:
        if isinstance(v, bool):
            return float(v)
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        raise MergekitConfigError(f"{where}: {v!r} is not a number")

    def scalar_or_gradient(v: Any) -> float | list[float]:
        if isinstance(v, list):
            if not v:
                raise MergekitConfigError(f"{where}: empty gradient")
            return [number(x) for x in v]
        return number(v)

    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out: list[dict[str, Any]] = []
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise MergekitConfigError(
                    f"{where}: filtered entries take 'filter' and 'value', got {entry!r}"
                )
            item: dict[str, Any] = {"value": scalar_or_gradient(entry["value"])}
            if entry.get("filter") is not None:
                item["filter"] = str(entry["filter"])
            out.append(item)
        return out
    return scalar_or_gradient(value)


def _params(raw: Any, where: str) -> dict[str, ParamValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergekitConfigError(f"{where}: parameters must be a mapping, got {raw!r}")
    return {str(k): _param(v, f"{where}.{k}") for k, v in raw.items()}


def _dtype(raw: Any, where: str) -> Dtype | None:
    if raw is None:
        return None
    if raw not in DTYPES:
        raise MergekitConfigError(
            f"{where}: dtype {raw!r} is not supported; use one of {sorted(set(DTYPES.values()))}"
        )
    return DTYPES[raw]


def _model_name(uri: str, taken: set[str]) -> str:
    stem = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    stem = re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-") or "model"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def from_mergekit_yaml(text: str, *, base_dir: str | None = None) -> ImportedMerge:
    """Parse one or more mergekit YAML documents into models and ordered steps.

    ``base_dir`` resolves relative model paths; without it they are an error."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise MergekitConfigError(f"not valid YAML: {e}") from None
    if not docs:
        raise MergekitConfigError("the YAML holds no merge configuration")
    named: dict[str | None, dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        where = f"document {i + 1}"
        if not isinstance(doc, dict):
            raise MergekitConfigError(f"{where}: expected a mapping")
        unknown = set(doc) - DOC_KEYS
        if unknown:
            hint = ""
            if unknown & {"slices", "modules"}:
                hint = " (layer slicing / per-module merges are not supported: merge whole models)"
            raise MergekitConfigError(
                f"{where}: unsupported key(s) {sorted(unknown)}{hint}; supported: {sorted(DOC_KEYS)}"
            )
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise MergekitConfigError(f"{where}: name must be a string")
        if name in named:
            raise MergekitConfigError(
                f"{where}: " + (f"duplicate name {name!r}" if name else "two unnamed documents")
            )
        named[name] = doc

    step_names = {n for n in named if n is not None}
    uris: dict[str, str] = {}  # uri -> model name
    taken = set(step_names)

    def source(ref: Any, where: str) -> str:
        if isinstance(ref, str) and ref in step_names:
            return ref
        uri = _uri(ref, where, base_dir)
        if uri not in uris:
            uris[uri] = _model_name(uri, taken)
            taken.add(uris[uri])
        return uris[uri]

    dtypes: set[Dtype] = set()
    out_dtypes: set[Dtype] = set()
    steps: dict[str, ResolvedMergeStep] = {}
    deps: dict[str, set[str]] = {}
    tok_raw_by_step: dict[str, Any] = {}
    for key, doc in named.items():
        label = key or "merge"
        where = f"merge {label!r}"
        method = doc.get("merge_method")
        if method not in METHODS:
            raise MergekitConfigError(
                f"{where}: merge_method {method!r} is not supported; supported: {sorted(METHODS)}"
            )
        base = source(doc["base_model"], f"{where}.base_model") if doc.get("base_model") is not None else None
        models = doc.get("models")
        if not isinstance(models, list) or not models:
            raise MergekitConfigError(f"{where}: 'models' must be a non-empty list")
        entries: list[MergeModelEntry] = []
        for j, m in enumerate(models):
            mw = f"{where}.models[{j}]"
            if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
                raise MergekitConfigError(f"{mw}: expected {{model, parameters}}, got {m!r}")
            params = _params(m.get("parameters"), f"{mw}.parameters")
            entries.append(MergeModelEntry(model=source(m["model"], f"{mw}.model"), parameters=params))
        for raw, target, what in (
            (doc.get("dtype"), dtypes, "dtype"),
            (doc.get("out_dtype"), out_dtypes, "out_dtype"),
        ):
            value = _dtype(raw, f"{where}.{what}")
            if value is not None:
                target.add(value)
        tok_raw = doc.get("tokenizer_source")
        if doc.get("tokenizer") is not None:
            tok_cfg = doc["tokenizer"]
            if not isinstance(tok_cfg, dict) or set(tok_cfg) - {"source"}:
                raise MergekitConfigError(
                    f"{where}.tokenizer: only {{source: …}} is supported, got {tok_cfg!r}"
                )
            tok_raw = tok_cfg.get("source")
        if tok_raw == "union":
            raise MergekitConfigError(f"{where}: tokenizer_source 'union' is not supported; name one model")
        if tok_raw is not None and tok_raw != "base":
            tok_raw = source(tok_raw, f"{where}.tokenizer_source")
        tok_raw_by_step[label] = tok_raw
        steps[label] = ResolvedMergeStep(
            name=label,
            method=cast(MergeMethod, method),
            base=base,
            models=entries,
            parameters=_params(doc.get("parameters"), f"{where}.parameters"),
        )
        deps[label] = {x for x in [base, *(e.model for e in entries)] if x is not None and x in step_names}
    if "merge" in step_names and None in named:
        raise MergekitConfigError(
            "a named document may not be called 'merge' (the unnamed result uses that name)"
        )
    if None in named:
        final_name = "merge"
    else:
        used: set[str] = set().union(*deps.values())
        roots = [n for n in steps if n not in used]
        if len(roots) != 1:
            raise MergekitConfigError(
                f"cannot tell which merge is the result: {sorted(roots)} are used by no other"
            )
        final_name = roots[0]
    order = _toposort(deps, final_name)
    unused = sorted(set(steps) - set(order))
    if unused:
        raise MergekitConfigError(f"merges {unused} are not used by the result {final_name!r}")

    def leaf(name: str) -> str:
        while name in steps:
            s = steps[name]
            name = s.base if s.base is not None else s.models[0].model
        return name

    tok = tok_raw_by_step[final_name]
    tokenizer_source = leaf(final_name if tok in (None, "base") else tok)
    if len(dtypes) > 1 or len(out_dtypes) > 1:
        raise MergekitConfigError(
            f"the documents use different dtypes ({sorted(dtypes)} / out {sorted(out_dtypes)}); one merge stage has one dtype"
        )
    return ImportedMerge(
        models={name: ModelRef(uri=uri) for uri, name in uris.items()},
        steps=[steps[n] for n in order],
        dtype=next(iter(dtypes), None),
        out_dtype=next(iter(out_dtypes), None),
        tokenizer_source=tokenizer_source,
    )


def _toposort(deps: dict[str, set[str]], final: str) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise MergekitConfigError(f"circular merge references: {' -> '.join([*path, n])}")
        state[n] = 1
        for d in sorted(deps[n]):
            visit(d, [*path, n])
        state[n] = 2
        order.append(n)

    visit(final, [])
    return order

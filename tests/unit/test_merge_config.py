"""mergekit YAML import: what users' recipes become, and everything refused loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from branchmerge_trainer.merge.config import MergekitConfigError, from_mergekit_yaml
from branchmerge_trainer.merge.stage import run
from branchmerge_trainer.merge.synthetic import qwen2_config, write_family
from branchmerge_trainer.runtime import ProgressReporter, StageContext
from branchmerge_trainer.stages import MergeStage
from branchmerge_trainer.storage import LocalStorage

TINYR1 = """
name: math_science
merge_method: arcee_fusion
base_model: {root}/science
models:
  - model: {root}/math
  - model: {root}/science
dtype: bfloat16
out_dtype: bfloat16
---
merge_method: arcee_fusion
base_model: {root}/code
models:
  - model: math_science
dtype: bfloat16
out_dtype: bfloat16
tokenizer_source: base
"""


def test_tinyr1_chain_becomes_two_ordered_steps() -> None:
    imp = from_mergekit_yaml(TINYR1.format(root="/m"))
    assert {k: v.uri for k, v in imp.models.items()} == {
        "science": "/m/science",
        "math": "/m/math",
        "code": "/m/code",
    }
    assert [(s.name, s.method, s.base, [e.model for e in s.models]) for s in imp.steps] == [
        ("math_science", "arcee_fusion", "science", ["math", "science"]),
        ("merge", "arcee_fusion", "code", ["math_science"]),
    ]
    assert (imp.dtype, imp.out_dtype, imp.tokenizer_source) == ("bfloat16", "bfloat16", "code")
    stage = imp.to_stage(name="m", output="/tmp/out", fingerprint="f", seed=3)
    assert isinstance(stage, MergeStage) and stage.seed == 3 and stage.tokenizer_source == "code"


def test_documents_in_any_order_and_all_named() -> None:
    text = """
name: final
merge_method: linear
models: [{model: mid, parameters: {weight: 2}}, {model: s3://b/c}]
---
name: mid
merge_method: slerp
base_model: s3://b/a
models: [{model: s3://b/b}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.5
"""
    imp = from_mergekit_yaml(text)
    assert [s.name for s in imp.steps] == ["mid", "final"]
    assert imp.steps[0].parameters == {
        "t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.5}]
    }
    assert imp.steps[1].models[0].parameters == {"weight": 2.0}
    assert imp.tokenizer_source == "a"  # the result's base chain: final -> mid -> a


def test_parameters_scalars_gradients_filters_and_dtype_aliases() -> None:
    imp = from_mergekit_yaml("""
merge_method: ties
base_model: /m/base
models:
  - model: /m/a
    parameters: {weight: [0, 0.5, 1], density: "0.5"}
  - model: /m/b
    parameters:
      weight: {filter: mlp, value: 0.3}
parameters: {normalize: true, int8_mask: true, lambda: 0.9}
dtype: bf16
""")
    (step,) = imp.steps
    assert step.models[0].parameters == {"weight": [0.0, 0.5, 1.0], "density": 0.5}
    assert step.models[1].parameters == {"weight": [{"filter": "mlp", "value": 0.3}]}
    assert step.parameters == {"normalize": 1.0, "int8_mask": 1.0, "lambda": 0.9}
    assert imp.dtype == "bfloat16" and imp.out_dtype is None


def test_relative_paths_need_a_base_dir() -> None:
    text = "merge_method: linear\nmodels: [{model: models/a}, {model: models/b}]\n"
    with pytest.raises(MergekitConfigError, match="hub model ids are not downloaded"):
        from_mergekit_yaml(text)
    imp = from_mergekit_yaml(text, base_dir="/data")
    assert sorted(m.uri for m in imp.models.values()) == ["/data/models/a", "/data/models/b"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("merge_method: linear\nslices: []\n", r"unsupported key\(s\) \['slices'\].*layer slicing"),
        ("merge_method: della\nmodels: [{model: /a}]\n", r"merge_method 'della' is not supported"),
        ("merge_method: linear\nmodels: [{model: Qwen/Qwen2.5-7B}]\n", r"'Qwen/Qwen2.5-7B' is neither"),
        ("merge_method: linear\nmodels: [{model: /a+/lora}]\n", r"LoRA references"),
        ("merge_method: linear\nmodels: [{model: /a}]\ntokenizer_source: union\n", r"'union' is not supported"),
        ("merge_method: linear\nmodels: [{model: /a}]\nchat_template: chatml\n", r"unsupported key\(s\) \['chat_template'\]"),
        ("merge_method: linear\nmodels: [{model: /a, weight: 1}]\n", r"expected \{model, parameters\}"),
        ("merge_method: linear\nmodels: [{model: /a, parameters: {weight: heavy}}]\n", r"'heavy' is not a number"),
        ("merge_method: linear\nmodels: [{model: /a}]\ndtype: int8\n", r"dtype 'int8' is not supported"),
        ("merge_method: linear\nmodels: []\n", r"'models' must be a non-empty list"),
        ("merge_method: linear\nmodels: [{model: /a}]\n---\nmerge_method: linear\nmodels: [{model: /b}]\n",
         r"two unnamed documents"),
        ("name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\nname: y\nmerge_method: linear\nmodels: [{model: x}]\n",
         r"cannot tell which merge is the result|circular"),
        ("name: x\nmerge_method: linear\nmodels: [{model: /a}]\n---\nmerge_method: linear\nmodels: [{model: /b}]\n",
         r"merges \['x'\] are not used"),
        ("name: x\nmerge_method: linear\nmodels: [{model: /a}]\ndtype: float16\n---\n"
         "merge_method: linear\nmodels: [{model: x}]\ndtype: bfloat16\n", r"different dtypes"),
        ("merge_method: linear\nmodels: [{model: /a}]\n: [\n", r"not valid YAML"),
    ],
)  # fmt: skip
def test_unsupported_or_broken_configs_are_errors(text: str, match: str) -> None:
    with pytest.raises(MergekitConfigError, match=match):
        from_mergekit_yaml(text)


def test_imported_recipe_merges_like_the_native_config(tmp_path: Path) -> None:
    cfg = qwen2_config(hidden=32, intermediate=64, layers=2, vocab=64, heads=4, kv_heads=2)
    dirs = write_family(
        tmp_path / "m", ["math", "science", "code"], cfg, extra_files={"tokenizer.json": b"{}"}
    )
    imp = from_mergekit_yaml(TINYR1.format(root=tmp_path / "m"))
    ctx = StageContext(storage=LocalStorage(), workdir=tmp_path / "w", reporter=ProgressReporter())
    run(imp.to_stage(name="m", output=str(tmp_path / "a"), fingerprint="f"), ctx)
    native = MergeStage.model_validate({
        "kind": "Merge", "name": "m", "fingerprint": "f", "output": str(tmp_path / "b"), "tokenizerSource": "code",
        "models": {k: {"uri": str(v)} for k, v in dirs.items()},
        "steps": [
            {"name": "math_science", "method": "arcee_fusion", "base": "science", "models": [{"model": "math"}]},
            {"name": "merge", "method": "arcee_fusion", "base": "code", "models": [{"model": "math_science"}]},
        ],
    })  # fmt: skip
    run(native, ctx)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

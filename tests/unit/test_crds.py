"""The CRDs: committed files are fresh, schemas are structural, defaults match the models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from branchmerge_operator.api import Distillation, parse_manifest
from branchmerge_operator.crds import DEFAULT_OUT_DIRS, crds, render, stale_files, write_crds
from branchmerge_operator.derive import stages_for

ROOT = Path(__file__).resolve().parents[2]

#: What a structural schema may contain (apiextensions.k8s.io/v1, Kubernetes 1.20).
ALLOWED = {
    "type", "description", "properties", "required", "items", "additionalProperties", "enum", "default",
    "format", "pattern", "maxLength", "minLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minItems", "maxItems", "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


@pytest.mark.parametrize("out", DEFAULT_OUT_DIRS)
def test_committed_crds_are_fresh(out: str) -> None:
    stale = stale_files(ROOT / out)
    assert not stale, f"regenerate with `branchmerge crds`: {stale}"


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    written = write_crds([tmp_path])
    assert sorted(p.name for p in written) == sorted(crds())
    assert all(p.read_text() == render(crds()[p.name]) for p in written)


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key in ("properties",):
            for name, child in node.get(key, {}).items():
                out += walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def schemas() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) for name, doc in crds().items()]


@pytest.mark.parametrize(("name", "schema"), schemas(), ids=[n for n, _ in schemas()])
def test_schema_is_structural(name: str, schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert set(node) <= ALLOWED, f"{name}{path}: {set(node) - ALLOWED}"
        special = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert "type" in node or special, f"{name}{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{name}{path}: anyOf outside int-or-string"
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        assert node.get("additionalProperties") is not False
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node:
                assert node[bound] is True
        if node.get("type") == "object" and "properties" in node:
            assert set(node.get("required", [])) <= set(node["properties"]), f"{name}{path}"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), f"{name}{path}: map keys must be required"
    assert schema["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize(("name", "schema"), schemas(), ids=[n for n, _ in schemas()])
def test_status_has_no_defaults(name: str, schema: dict[str, Any]) -> None:
    assert not [p for p, n in walk(schema["properties"]["status"]) if "default" in n]


def test_names_columns_and_subresources() -> None:
    docs = crds()
    dist = docs["branchmerge.io_distillations.yaml"]["spec"]
    bj = docs["branchmerge.io_branchjobs.yaml"]["spec"]
    assert dist["group"] == bj["group"] == "branchmerge.io"
    assert dist["names"]["shortNames"] == ["dist"] and bj["names"]["shortNames"] == ["bj"]
    assert dist["names"]["categories"] == bj["names"]["categories"] == ["branchmerge"]
    for spec in (dist, bj):
        version = spec["versions"][0]
        assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
        assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
        assert columns["Phase"] == ".status.phase"
        assert columns["Age"] == ".metadata.creationTimestamp"
        assert not any("[-1" in path for path in columns.values())
    dist_columns = {c["name"]: c["jsonPath"] for c in dist["versions"][0]["additionalPrinterColumns"]}
    assert dist_columns["Branches"] == ".status.branchesSucceeded"
    assert dist_columns["Merged"] == ".status.mergedModel"
    assert dist_columns["Headline"] == ".status.headline"


def test_no_cel_rules() -> None:
    text = "".join(render(doc) for doc in crds().values())
    assert "x-kubernetes-validations" not in text


def spec_schema(kind_file: str) -> dict[str, Any]:
    return crds()[kind_file]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server does with schema defaults (objects and arrays, recursively)."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(out[name], prop)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


@pytest.mark.parametrize("example", ["tinyr1-32b.yaml", "tiny-cpu.yaml"])
def test_server_defaults_agree_with_the_models(example: str) -> None:
    """A manifest defaulted by the CRD parses to the same model, hence the same fingerprints."""
    doc = yaml.safe_load((ROOT / "examples" / example).read_text())
    defaulted = dict(doc, spec=apply_defaults(doc["spec"], spec_schema("branchmerge.io_distillations.yaml")))
    assert defaulted["spec"] != doc["spec"]  # the server does fill something in
    plain, served = parse_manifest(doc), parse_manifest(defaulted)
    assert isinstance(plain, Distillation) and isinstance(served, Distillation)
    assert served.spec == plain.spec
    assert [s.fingerprint for s in stages_for(served)] == [s.fingerprint for s in stages_for(plain)]


def test_benchmarks_keep_unset_fields_unset_for_presets() -> None:
    schema = spec_schema("branchmerge.io_distillations.yaml")
    bench = schema["properties"]["eval"]["properties"]["benchmarks"]["items"]
    assert not [p for p, n in walk(bench) if "default" in n]


def test_polymorphic_merge_parameters_are_preserved() -> None:
    steps = spec_schema("branchmerge.io_distillations.yaml")["properties"]["merge"]["properties"]["steps"]
    params = steps["items"]["properties"]["parameters"]
    assert params["type"] == "object"
    assert params["additionalProperties"] == {"x-kubernetes-preserve-unknown-fields": True}

"""The Argo CD health checks (Lua) against their fixtures, in a real Lua interpreter.

Argo CD runs health scripts in gopher-lua (Lua 5.1) with the object as the global `obj`;
lupa's Lua 5.1 runtime does the same here, and Lua 5.4 checks the script uses nothing
version-specific. Fixtures follow Argo CD's own `health_test.yaml` format, so the scripts can
be contributed upstream as they are.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARGO = REPO / "manifests" / "gitops" / "argocd" / "branchmerge.io"
KINDS = ("Distillation", "BranchJob")
LUAS = ("lupa.lua51", "lupa.lua54")
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for kind in KINDS:
        spec = yaml.safe_load((ARGO / kind / "health_test.yaml").read_text())
        for test in spec["tests"]:
            out.append((kind, test["inputPath"], test["healthStatus"]))
    return out


def to_lua(lua: Any, value: Any) -> Any:
    """Python (YAML) data as Lua values: lists become 1-based tables; None is nil."""
    if isinstance(value, dict):
        return lua.table_from({k: to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, v) for v in value])
    return value


def health(module: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    lupa = importlib.import_module(module)
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = to_lua(lua, obj)
    result = lua.execute((ARGO / kind / "health.lua").read_text())
    return dict(result.items())


@pytest.mark.parametrize("module", LUAS)
@pytest.mark.parametrize(
    ("kind", "input_path", "expected"), _cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_health_matches_fixture(module: str, kind: str, input_path: str, expected: dict[str, str]) -> None:
    obj = yaml.safe_load((ARGO / kind / input_path).read_text())
    assert obj["kind"] == kind
    got = health(module, kind, obj)
    assert got == {"status": expected["status"], "message": expected["message"]}


def test_every_fixture_is_tested_and_covers_every_status() -> None:
    for kind in KINDS:
        listed = {
            t["inputPath"] for t in yaml.safe_load((ARGO / kind / "health_test.yaml").read_text())["tests"]
        }
        on_disk = {f"testdata/{p.name}" for p in (ARGO / kind / "testdata").glob("*.yaml")}
        assert listed == on_disk, kind
        statuses = {
            t["healthStatus"]["status"]
            for t in yaml.safe_load((ARGO / kind / "health_test.yaml").read_text())["tests"]
        }
        assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}, kind
        assert statuses <= STATUSES


def test_both_kinds_share_one_script() -> None:
    # Argo CD takes one script per kind; the logic is the same, so the files must not drift.
    assert (ARGO / "Distillation" / "health.lua").read_bytes() == (
        ARGO / "BranchJob" / "health.lua"
    ).read_bytes()


def test_missing_metadata_and_empty_conditions_do_not_crash() -> None:
    for obj, status in [
        ({"kind": "Distillation"}, "Progressing"),
        ({"kind": "Distillation", "status": {"conditions": []}}, "Progressing"),
        ({"kind": "Distillation", "status": {"phase": "Running"}}, "Progressing"),
        ({"kind": "Distillation", "spec": {"runPolicy": {"suspend": True}}}, "Suspended"),
        (
            {
                "kind": "BranchJob",
                "metadata": {"generation": 1},
                "status": {"conditions": [{"type": "Ready"}]},
            },
            "Progressing",
        ),
    ]:
        assert health("lupa.lua51", obj["kind"], obj)["status"] == status, obj


def test_flux_health_check_snippet_names_both_kinds() -> None:
    docs = list(yaml.safe_load_all((REPO / "manifests/gitops/flux/kustomization.yaml").read_text()))
    exprs = [e for d in docs for e in d["spec"].get("healthCheckExprs", [])]
    assert {(e["apiVersion"], e["kind"]) for e in exprs} == {
        ("branchmerge.io/v1alpha1", "Distillation"),
        ("branchmerge.io/v1alpha1", "BranchJob"),
    }
    for e in exprs:
        assert {"current", "failed", "inProgress"} <= set(e), e
        assert "observedGeneration" in e["inProgress"]

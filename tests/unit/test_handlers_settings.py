"""kopf settings the operator applies (no cluster): the cheap essence storage and scanning."""

from __future__ import annotations

import copy
from typing import Any

import kopf

from branchmerge_operator import handlers
from branchmerge_operator.reconcile import OperatorConfig


def _distillation() -> dict[str, Any]:
    return {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {
            "name": "d", "namespace": "ns", "uid": "u1", "generation": 3, "resourceVersion": "77",
            "labels": {"team": "a"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": '{"spec": {}}',
                "branchmerge.io/last-handled-configuration": '{"spec": {"old": 1}}',
                "example.com/note": "kept",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "o1"}],
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:branches": {}}}}],
        },
        "spec": {"student": {"uri": "s3://s"}, "branches": [{"name": "math", "datasets": [{"uri": "s3://m"}]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
    }


def test_essence_of_a_change_handled_kind_is_what_kopf_builds() -> None:
    ours = handlers.EssenceStorage(prefix="branchmerge.io", key="last-handled-configuration",
                                   tracked=frozenset({("branchmerge.io", "Distillation")}))
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="branchmerge.io", key="last-handled-configuration")
    for raw in (_distillation(), {**_distillation(), "metadata": {"name": "bare"}}):
        body = kopf.Body(copy.deepcopy(raw))
        built = ours.build(body=body)
        assert built == kopfs.build(body=body)
        assert built  # a spec at least
        # no sharing with the watched body: kopf stores and compares it later
        built["spec"]["student"]["uri"] = "changed"  # type: ignore[index]
        assert body["spec"]["student"]["uri"] == "s3://s"


def test_essence_of_resources_without_change_handlers_is_empty() -> None:
    ours = handlers.EssenceStorage(prefix="branchmerge.io", key="last-handled-configuration")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    assert ours.build(body=kopf.Body(pod)) == {}
    assert ours.build(body=kopf.Body(_distillation())) == {}  # no change handlers (event-driven)
    assert ours.build(body=kopf.Body(_distillation()), extra_fields=["status.phase"])  # kopf's own path


def test_change_handlers_match_the_essence_storage() -> None:
    """EssenceStorage relies on it: a change handler on a kind needs it in CHANGE_HANDLED_KINDS."""
    registry = kopf.get_default_registry()
    kinds = {(h.selector.group, h.selector.any_name) for h in registry._changing.get_all_handlers() if h.selector}
    assert kinds == set()
    assert frozenset() == handlers.CHANGE_HANDLED_KINDS


def test_scanning_is_disabled_for_named_namespaces_only() -> None:
    def scanning(config: OperatorConfig) -> bool:
        settings = kopf.OperatorSettings()
        handlers.configure_settings(settings, config)
        return not settings.scanning.disabled

    assert scanning(OperatorConfig(clusterwide=True))
    assert not scanning(OperatorConfig(clusterwide=False, namespaces=["team-a"]))
    assert not scanning(OperatorConfig(clusterwide=False, namespaces=["team-a", "team-b"]))
    assert scanning(OperatorConfig(clusterwide=False, namespaces=["team-*"]))


def test_gc_is_tuned_once_per_process() -> None:
    import gc

    before = gc.get_threshold()
    tuned = handlers._state.gc_tuned
    try:
        handlers._state.gc_tuned = False
        handlers.tune_gc()
        assert gc.get_threshold()[0] >= handlers.GC_GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0
        gc.set_threshold(*before)
        handlers.tune_gc()  # a second operator start in the same process changes nothing
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        handlers._state.gc_tuned = tuned

"""Merge methods: one small module of pure tensor functions each, plus a registry of their
specs (inputs, parameters) that the engine validates plans against."""

from __future__ import annotations

from . import arcee_fusion, dare_linear, dare_ties, linear, model_stock, slerp, task_arithmetic, ties
from .spec import MergeCall, MethodSpec, ParamScope, ParamSpec

METHODS: dict[str, MethodSpec] = {
    m.SPEC.name: m.SPEC
    for m in (arcee_fusion, linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, model_stock)
}


def get_method(name: str) -> MethodSpec:
    """The spec of a method, or ValueError listing the supported ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; supported: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "MergeCall", "MethodSpec", "ParamScope", "ParamSpec", "get_method"]

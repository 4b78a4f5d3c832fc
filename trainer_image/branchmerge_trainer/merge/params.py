"""Parameter values per tensor, with mergekit's rules.

A value is a scalar, a gradient (a list interpolated linearly over depth: layer i of n gets
``t = i / (n - 1)``; tensors outside the layer stack get ``t = 0``), or a list of
``{filter, value}`` entries where the first entry whose filter is a substring of the tensor
name (or is absent / ``*``) wins, its value again a scalar or gradient. A model's own
parameters take precedence over the step's; a filter list that matches nothing falls
through to the next level, then to the method's default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..stages import ParamValue

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp…`` -> 7), if any."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def depth_fraction(tensor: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer i of n -> i / (n - 1) (1 for a single layer);
    embeddings, final norm and head -> 0."""
    i = layer_index(tensor)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def check_value(value: Any, where: str) -> None:
    """ValueError unless ``value`` is a well-formed ParamValue (before any tensor is read)."""
    if isinstance(value, bool | int | float):
        return
    if isinstance(value, list) and value and all(isinstance(v, bool | int | float) for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ValueError(
                    f"{where}: each filtered entry needs 'value' (and optionally 'filter'), got {entry}"
                )
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}: 'filter' must be a string, got {entry['filter']!r}")
            inner = entry["value"]
            if isinstance(inner, list) and inner and all(isinstance(v, dict) for v in inner):
                raise ValueError(f"{where}: filtered values cannot nest filters")
            check_value(inner, where)
        return
    raise ValueError(
        f"{where}: {value!r} is not a number, a gradient (list of numbers) or a list of {{filter, value}}"
    )


def evaluate(value: ParamValue | Any, tensor: str, t: float) -> float | None:
    """The number ``value`` gives for ``tensor`` at depth ``t``; None when a filter list
    matches nothing (so a lower-precedence setting applies)."""
    if isinstance(value, bool | int | float):
        return float(value)
    if not value:
        return None
    if all(isinstance(v, bool | int | float) for v in value):
        nums = [float(v) for v in value if isinstance(v, bool | int | float)]
        scaled = t * (len(nums) - 1)
        i0 = int(scaled)
        i1 = min(len(nums) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * nums[i0] + frac * nums[i1]
    for entry in value:
        if not isinstance(entry, dict):
            return None
        flt = entry.get("filter")
        if flt is None or flt == "*" or (tensor and flt in tensor):
            return evaluate(entry["value"], tensor, t)
    return None


def resolve(
    name: str, scopes: Sequence[Mapping[str, ParamValue] | None], tensor: str, t: float, default: float | None
) -> float | None:
    """First value that applies, from the highest-precedence scope down, else ``default``."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate(scope[name], tensor, t)
            if v is not None:
                return v
    return default

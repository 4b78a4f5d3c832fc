"""What a merge method declares (inputs, parameters) and how the engine calls it.

The engine validates a whole plan against these specs before reading any weight, so a typo
in a parameter name or a density of 1.5 fails in milliseconds instead of after the
download. Methods themselves are pure functions over tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

#: shared: one value per step; input: one per input model (the base too);
#: non_base: one per input other than the base (mergekit's scopes).
ParamScope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    scope: ParamScope
    default: float | None  # None: required
    kind: Literal["float", "bool"] = "float"
    low: float | None = None
    high: float | None = None
    doc: str = ""

    def check(self, value: float, where: str) -> float:
        """The validated value, or ValueError naming the parameter and place."""
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: parameter {self.name!r} must be a finite number, got {value!r}")
        value = float(value)
        if self.kind == "bool" and value not in (0.0, 1.0):
            raise ValueError(f"{where}: parameter {self.name!r} is a boolean (true/false), got {value}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{where}: parameter {self.name!r}={value} is below {self.low}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{where}: parameter {self.name!r}={value} is above {self.high}")
        return value


@dataclass(frozen=True)
class MergeCall:
    """One output tensor's worth of work for one step."""

    name: str
    tensors: Sequence[Tensor]  # same shape, in the step's working dtype, on one device
    base: int | None  # index of the base model in ``tensors``
    params: Sequence[Mapping[str, float]]  # per input, resolved for this tensor
    shared: Mapping[str, float]
    key: int  # RNG key for (stage seed, step, tensor); inputs derive their own
    out_dtype: torch.dtype
    stats: dict[str, float] = field(default_factory=dict)  # diagnostics a method may add to

    def others(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    base: Literal["required", "optional"]
    min_inputs: int  # counting the base
    max_inputs: int | None
    run: Callable[[MergeCall], Tensor]
    params: tuple[ParamSpec, ...] = field(default_factory=tuple)
    doc: str = ""

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def scoped(self, *scopes: ParamScope) -> list[ParamSpec]:
        return [p for p in self.params if p.scope in scopes]
